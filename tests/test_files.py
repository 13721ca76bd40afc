"""The one atomic writer: folders are swapped in one step, names of any legal length."""

import os

from llmrec.files import _exchange, bounded_name, replace_atomically


def write_folder(text: str):
    def write(temp):
        temp.mkdir()
        (temp / "state.json").write_text(text)
    return write


def test_a_folder_is_swapped_in_one_step_and_the_old_one_removed_after(tmp_path):
    target = tmp_path / "checkpoint"
    replace_atomically(target, write_folder("old"))
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a")
    # The swap the writer relies on: both names exist before and after, contents exchanged.
    assert _exchange(a, b) and (b / "x").read_text() == "a" and not (a / "x").exists()
    replace_atomically(target, write_folder("new"))
    assert (target / "state.json").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "checkpoint"]  # no temp or old copy left


def test_a_255_byte_target_name_gets_a_temp_name_that_fits(tmp_path):
    name = "p" * 255
    path = replace_atomically(tmp_path / name, lambda temp: temp.write_text("x"))
    assert path.read_text() == "x" and os.listdir(tmp_path) == [name]
    assert len(bounded_name(f".{name}.{os.getpid()}.tmp").encode()) <= 255
