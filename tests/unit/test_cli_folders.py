"""Which files `ingestd upload FOLDER` picks from a folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingestd.cli.main import _expand

# The files of the fixture folder that an upload of the folder picks.
CHOSEN_FILES = ["alias.md", "notes.md", "relative.txt", "sub/inner.txt"]


def relative_names(files: list[Path], folder: Path) -> list[str]:
    return sorted(path.relative_to(folder).as_posix() for path in files)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.md").write_text("# not chosen\n", encoding="utf-8")
    chosen = tmp_path / "chosen"
    (chosen / "sub").mkdir(parents=True)
    (chosen / "notes.md").write_text("# notes\n", encoding="utf-8")
    (chosen / "sub" / "inner.txt").write_text("inner\n", encoding="utf-8")
    (chosen / "alias.md").symlink_to(chosen / "notes.md")
    (chosen / "relative.txt").symlink_to(Path("sub") / "inner.txt")
    (chosen / "escape.md").symlink_to(outside / "secret.md")
    (chosen / "sub" / "up.md").symlink_to(Path("..") / ".." / "outside" / "secret.md")
    (chosen / "linked-folder").symlink_to(outside, target_is_directory=True)
    return chosen


def test_links_outside_folder_skipped(folder: Path, capsys) -> None:
    files, unreadable = _expand((folder,))

    assert relative_names(files, folder) == CHOSEN_FILES
    assert unreadable == 0
    message = " ".join(capsys.readouterr().err.split())
    assert "skipping 2 symbolic link(s) that point outside the folder" in message
    assert "escape.md" in message
    assert "up.md" in message
    assert "name a file on the command line" in message
    assert "skipping 1 linked folder(s): " in message
    assert "linked-folder" in message


def test_named_link_is_followed(folder: Path, capsys) -> None:
    # A file named on the command line is the user's choice, link or not.
    files, unreadable = _expand((folder / "escape.md",))

    assert files == [folder / "escape.md"]
    assert unreadable == 0
    assert "symbolic link" not in capsys.readouterr().err


def test_folder_given_through_link(folder: Path, tmp_path: Path) -> None:
    # The folder's own path may be a link. Links inside it are judged
    # against the folder it points to.
    link = tmp_path / "link-to-chosen"
    link.symlink_to(folder, target_is_directory=True)

    files, _ = _expand((link,))

    assert relative_names(files, link) == CHOSEN_FILES


def test_link_loop_reported_unreadable(folder: Path, capsys) -> None:
    (folder / "loop1.md").symlink_to("loop2.md")
    (folder / "loop2.md").symlink_to("loop1.md")

    files, unreadable = _expand((folder,))

    assert relative_names(files, folder) == CHOSEN_FILES
    assert unreadable == 2
    message = " ".join(capsys.readouterr().err.split())
    assert "loop1.md" in message
    assert "loop2.md" in message


def test_hidden_entries_skipped_unless_named(tmp_path: Path, capsys) -> None:
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "description.txt").write_text("git\n", encoding="utf-8")
    (tmp_path / ".venv" / "lib").mkdir(parents=True)
    (tmp_path / ".venv" / "lib" / "README.md").write_text("pkg\n", encoding="utf-8")
    (tmp_path / ".draft.md").write_text("# draft\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("# notes\n", encoding="utf-8")

    files, unreadable = _expand((tmp_path,))

    assert files == [tmp_path / "notes.md"]
    assert unreadable == 0
    message = " ".join(capsys.readouterr().err.split())
    assert "skipping 3 hidden file(s) and folder(s)" in message
    assert ".draft.md" in message
    # A hidden file named on the command line is uploaded.
    assert _expand((tmp_path / ".draft.md",))[0] == [tmp_path / ".draft.md"]
