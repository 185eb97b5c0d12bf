"""Messages that say the cause once and in the user's terms: repeated causes grouped (a wrong hidden_size in
every layer is one line that names hidden_size), the common mix-ups recognised (another recurrent kind by
its gate count), and the grammar of the words around names and counts. Each test loads real modules and
follows the fix it was given.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import weightport
from weightport.errors import LoadError, Problem, SourceError, VerifyError, a_or_an, compact_names, counted


def arrays_of(module: nn.Module) -> dict[str, np.ndarray]:
    return {name: t.detach().numpy().copy() for name, t in module.state_dict().items()}


def snapshot(module: nn.Module) -> dict[str, bytes]:
    return {name: t.detach().numpy().tobytes() for name, t in module.state_dict().items()}


def refused(module: nn.Module, source: object, **kw: object) -> LoadError:
    before = snapshot(module)
    with pytest.raises(LoadError) as info:
        weightport.load(module, source, **kw)  # type: ignore[arg-type]
    assert snapshot(module) == before
    return info.value


# ---- one line per cause -------------------------------------------------------------------------------


def test_a_wrong_hidden_size_in_every_layer_is_one_problem_that_names_hidden_size() -> None:
    given = nn.LSTM(3, 8, num_layers=2, bidirectional=True)
    error = refused(nn.LSTM(3, 4, num_layers=2, bidirectional=True), arrays_of(given))
    (problem,) = error.problems  # not 16 lines, one per tensor
    assert problem.expected.startswith("hidden_size=4 in every LSTM layer")
    assert problem.found.startswith("hidden_size=8 in the given mapping")
    assert "'weight_hh_l0' is (32, 8)" in problem.found
    assert "nn.LSTM(3, 8, num_layers=2, bidirectional=True)" in problem.fix
    assert len(str(error).splitlines()) == 2
    # the fix, followed, loads
    built = eval(re.search(r"nn\.LSTM\([^)]*\)", problem.fix)[0], {"nn": nn})  # type: ignore[index]
    weightport.load(built, arrays_of(given))
    assert torch.equal(built.weight_hh_l1_reverse, given.weight_hh_l1_reverse)


def test_input_and_hidden_size_both_wrong_in_a_submodule_are_said_together() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.GRU(3, 4, num_layers=3, batch_first=True))
    given = nn.Sequential(nn.Linear(2, 5), nn.GRU(5, 6, num_layers=3, batch_first=True))
    error = refused(model, {k[2:]: v for k, v in arrays_of(given).items() if k.startswith("1.")}, prefix="1.")
    (problem,) = error.problems
    assert problem.name == "1"
    assert problem.expected.startswith("hidden_size=4, input_size=3 in every GRU layer")
    assert problem.found.startswith("hidden_size=6, input_size=5")
    assert "nn.GRU(5, 6, num_layers=3, batch_first=True)" in problem.fix


def test_one_wrong_tensor_keeps_its_own_problem() -> None:
    arrays = arrays_of(nn.RNN(3, 4))
    arrays["weight_ih_l0"] = np.zeros((4, 4), np.float32)
    (problem,) = refused(nn.RNN(3, 4), arrays).problems
    assert problem.name == "weight_ih_l0" and "(hidden_size, input_size)" in problem.expected


def test_shapes_no_sizes_explain_stay_one_problem_each() -> None:
    arrays = arrays_of(nn.LSTM(3, 4))
    arrays["weight_hh_l0"] = np.zeros((16, 5), np.float32)  # hidden_size 5 here ...
    arrays["bias_ih_l0"] = np.zeros(17, np.float32)  # ... and no size at all here
    error = refused(nn.LSTM(3, 4), arrays)
    assert [p.name for p in error.problems] == ["bias_ih_l0", "weight_hh_l0"]


KINDS = {"RNN": (nn.RNN, 1), "GRU": (nn.GRU, 3), "LSTM": (nn.LSTM, 4)}


@pytest.mark.parametrize("cell", [False, True], ids=["layer", "cell"])
@pytest.mark.parametrize(("given", "into"), [(a, b) for a in KINDS for b in KINDS if a != b])
def test_another_recurrent_kind_is_named_by_its_gate_count(given: str, into: str, cell: bool) -> None:
    suffix = "Cell" if cell else ""
    make = {k: getattr(nn, k + suffix) for k in KINDS}
    source = make[given](3, 4)
    error = refused(make[into](3, 4), arrays_of(source))
    (problem,) = error.problems
    gates = KINDS[given][1]
    article = "an" if given in ("RNN", "LSTM") else "a"
    assert (
        f"this looks like {article} {given}{suffix} ({gates} gate{'s' if gates > 1 else ''})" in problem.found
    )
    assert f"build the module as nn.{given}{suffix}(3, 4)" in problem.fix
    rebuilt = make[given](3, 4)
    weightport.load(rebuilt, arrays_of(source))
    assert snapshot(rebuilt) == snapshot(source)


def test_a_gru_state_dict_into_a_deeper_lstm_says_gru_once() -> None:
    source = nn.GRU(3, 4, num_layers=2, bidirectional=True)
    error = refused(nn.LSTM(3, 4, num_layers=2, bidirectional=True), arrays_of(source))
    (line,) = error.lines()
    assert "this looks like a GRU (3 gates), not an LSTM" in line
    assert "nn.GRU(3, 4, num_layers=2, bidirectional=True)" in line


def test_missing_tensors_share_one_line_and_the_names_are_said_compactly() -> None:
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(12)])
    arrays = {k: v for k, v in arrays_of(model).items() if k.endswith(".bias")}
    error = refused(model, arrays)
    assert len(error.problems) == 12
    (line,) = error.lines()
    assert line.startswith("'{0..11}.weight' (12 tensors): expected a value for each, found nothing")
    assert "Fix: for each, add it to the source, or pass strict=False to leave it as it is." in line
    weightport.load(model, arrays, strict=False)  # the fix, followed


def test_lines_differing_in_more_than_their_names_are_not_merged() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 4))
    arrays = {
        "0.weight": np.ones((2, 2)),
        "0.bias": np.ones(3),
        "1.weight": np.ones((4, 4)),
        "1.bias": np.ones(4),
    }
    error = refused(model, arrays)
    assert [line.split(":")[0] for line in error.lines()] == ["'0.weight'", "'1.weight'"]


def test_format_lists_as_many_lines_as_asked_and_says_where_the_rest_are() -> None:
    problems = [Problem(f"t{i}", f"shape ({i},)", "shape (0,)", "resize it") for i in range(6)]
    error = LoadError(problems)
    assert error.format(2, more="--problems all").splitlines()[-1] == "  ... and 4 more (--problems all)"
    assert len(error.format(None).splitlines()) == 7
    assert str(error) == error.format()


# ---- the wrong kind of source -------------------------------------------------------------------------


def test_a_module_passed_as_the_source_suggests_its_state_dict() -> None:
    source, target = nn.LSTM(3, 4), nn.LSTM(3, 4)
    with pytest.raises(SourceError, match=r"from an LSTM module itself.*other\.state_dict\(\)"):
        weightport.load(target, source)  # type: ignore[arg-type]
    weightport.load(target, source.state_dict())  # the fix, followed
    assert snapshot(target) == snapshot(source)


def test_the_model_and_the_arrays_swapped_says_which_goes_first() -> None:
    with pytest.raises(LoadError, match=r"pass the model first and the arrays second"):
        weightport.load(arrays_of(nn.Linear(2, 2)), nn.Linear(2, 2))  # type: ignore[arg-type]


# ---- grammar -------------------------------------------------------------------------------------------


def test_articles_follow_the_sound_of_the_word() -> None:
    said = [a_or_an(w) for w in ("int", "RNN", "LSTM", "GRU", "Linear", "ndarray", "uint8", "ONNX", "MLP")]
    assert said == [
        "an int",
        "an RNN",
        "an LSTM",
        "a GRU",
        "a Linear",
        "an ndarray",
        "a uint8",
        "an ONNX",
        "an MLP",
    ]
    assert [counted(n, "output") for n in (0, 1, 2)] == ["0 outputs", "1 output", "2 outputs"]


def test_a_key_that_is_no_string_is_said_with_its_article() -> None:
    with pytest.raises(SourceError, match=r"key Ellipsis is an ellipsis; tensor names must be strings"):
        weightport.load(nn.Linear(2, 2), {...: np.ones((2, 2))})  # type: ignore[dict-item]


def test_one_expected_output_is_said_in_the_singular() -> None:
    rnn = nn.GRU(3, 4)
    x = np.ones((5, 1, 3), np.float32)
    with pytest.raises(VerifyError, match=r"the module returned 2 outputs but 1 was expected"):
        weightport.verify(rnn, x, (np.zeros((5, 1, 4), np.float32),))


def test_names_are_compacted_by_their_numbers_and_directions() -> None:
    names = [
        f"rnn.{role}_l{k}{d}" for k in range(3) for role in ("weight_ih", "bias_hh") for d in ("", "_reverse")
    ]
    assert compact_names(names) == ["rnn.weight_ih_l{0..2}{,_reverse}", "rnn.bias_hh_l{0..2}{,_reverse}"]
    assert compact_names(["b.01", "b.02"]) == ["b.{01,02}"]  # leading zeros kept as written
    assert compact_names([f"{i}.w" for i in (0, 1, 2, 3, 5, 7, 8, 9)]) == ["{0..3,5,7..9}.w"]
