"""The demo's command line: bad options stop it before any model is built, with a message naming the option."""

from __future__ import annotations

import io

import pytest
import torch

from sparse_compile.demo import parse_args, progress


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--height", "31"], "--height must be a multiple of 2"),
        (["--width", "8"], "--width: must be at least 16"),
        (["--steps", "3", "--dense-steps", "4"], "--dense-steps (4) must not exceed --steps (3)"),
        (["--device", "tpu"], "--device must be cpu or cuda"),
        (["--out", "/no/such/folder/strip.png"], "--out: folder /no/such/folder does not exist"),
        (["--out", "/tmp/strip"], "--out must name a .png file"),
    ],
)
def test_bad_options_exit_with_a_message_naming_the_option(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_asking_for_cuda_without_a_gpu_says_so(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        parse_args(["--device", "cuda"])
    assert "sees no CUDA GPU" in capsys.readouterr().err


def test_progress_into_a_file_is_one_line_without_carriage_returns():
    stream = io.StringIO()
    on_step = progress("dense", 4, stream)
    for i in range(4):
        on_step(i)
    text = stream.getvalue()
    assert "\r" not in text and text.count("\n") == 1 and "4 steps" in text
