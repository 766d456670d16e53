"""The comma-separated integer lists of every command line: one parser (sampler_service.arguments),
the same answers and the same errors from `sampler-client` and the bench commands."""

from __future__ import annotations

import argparse

import pytest

from bench.__main__ import main as bench_main
from sampler_service.arguments import int_list, positive_int, positive_int_list
from sampler_service.client import main as client_main


def test_int_list_parses_and_names_the_bad_text() -> None:
    assert int_list("3, 5,10") == [3, 5, 10]
    assert int_list("0,-1") == [0, -1]
    assert int_list("") == []
    assert int_list("4,,") == [4]
    with pytest.raises(argparse.ArgumentTypeError, match=r"'3,x' is not a comma-separated list of integers"):
        int_list("3,x")


def test_positive_lists_and_ints_state_the_range() -> None:
    assert positive_int_list("1,20") == [1, 20]
    assert positive_int("7") == 7
    with pytest.raises(argparse.ArgumentTypeError, match=r"^0 is out of range: expected integers >= 1$"):
        positive_int_list("5,0")
    with pytest.raises(argparse.ArgumentTypeError, match=r"is empty: expected comma-separated integers >= 1"):
        positive_int_list(" , ")
    with pytest.raises(argparse.ArgumentTypeError, match=r"^0 is out of range: expected an integer >= 1$"):
        positive_int("0")


@pytest.mark.parametrize(
    ("main", "argv", "expected"),
    [
        (client_main, ["plan", "--labels", "1,x"], "argument --labels: '1,x' is not a comma-separated list"),
        (client_main, ["generate", "--seeds", "2.5"], "argument --seeds: '2.5' is not a comma-separated list"),
        (bench_main, ["fd-vs-nfe", "--out", "x", "--nfe", "5,0"], "argument --nfe: 0 is out of range"),
        (bench_main, ["step-error", "--out", "x", "--nfe", "a"], "argument --nfe: 'a' is not a comma-separated list"),
    ],
)
def test_commands_reject_bad_lists_at_the_boundary(main, argv, expected, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err
