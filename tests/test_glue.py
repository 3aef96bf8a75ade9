"""normlab.runtime.glue: myst_nb's glue in the book; a printed ``name = value`` line elsewhere."""

import normlab.runtime.glue as glue_module


def test_outside_the_book_glue_prints_the_value_unless_quiet(monkeypatch, capsys):
    monkeypatch.setattr(glue_module, "_book_glue", None)
    glue_module.glue("acc", 0.5, display=False)
    glue_module.glue("hidden", 1, display=False, quiet=True)
    assert capsys.readouterr().out == "acc = 0.5\n"


def test_in_the_book_glue_hands_the_value_to_myst_nb_and_prints_nothing(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(glue_module, "_book_glue", lambda name, value, display: calls.append((name, value, display)))
    glue_module.glue("acc", 0.5, display=False)
    glue_module.glue("verdict", "met", display=False, quiet=True)
    assert calls == [("acc", 0.5, False), ("verdict", "met", False)]
    assert capsys.readouterr().out == ""
