"""TensorFlow's start-up INFO lines are held back from operators; nothing else is."""

from __future__ import annotations

import os
import textwrap

import pytest
from conftest import run_python

from ldct_node.cli.startup_chatter import filtered

_IMPORT = textwrap.dedent(
    """
    import sys
    from ldct_node.cli.startup_chatter import hold_tensorflow_startup_chatter
    if sys.argv[1] == "held":
        assert hold_tensorflow_startup_chatter()
    print("before", file=sys.stderr, flush=True)
    import tensorflow as tf
    print("after", tf.constant(2).numpy() * 2, file=sys.stderr, flush=True)
    """
)


def test_filtered_drops_absl_info_lines_and_keeps_everything_else() -> None:
    text = (
        b"WARNING: All log messages before absl::InitializeLog() is called are written to "
        b"STDERR\n"
        b"I0000 00:00:1796210390.429560   16451 port.cc:153] oneDNN custom operations are on.\n"
        b"I1202 11:32:07.123456   16451 cpu_feature_guard.cc:227] This TensorFlow binary\n"
        b"W0000 00:00:1796210390.5   16451 cuda.cc:12] no GPU found\n"
        b"E0000 00:00:1796210390.6   16451 op.cc:1] something broke\n"
        b"Traceback (most recent call last):\n"
        b"I think this line is a message of ours\n"
    )
    assert filtered(text) == (
        b"W0000 00:00:1796210390.5   16451 cuda.cc:12] no GPU found\n"
        b"E0000 00:00:1796210390.6   16451 op.cc:1] something broke\n"
        b"Traceback (most recent call last):\n"
        b"I think this line is a message of ours\n"
    )


@pytest.mark.parametrize("mode", ["held", "plain"])
def test_first_tensorflow_import_writes_no_info_lines_to_stderr(mode: str) -> None:
    """With oneDNN's operations on (forced here; the default on AVX-512 VNNI/BF16 CPUs)
    TensorFlow logs "oneDNN custom operations are on" past TF_CPP_MIN_LOG_LEVEL; held,
    stderr carries only what the program wrote, in order."""
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    res = run_python(_IMPORT, mode, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    if mode == "held":
        assert res.stderr == "before\nafter 4\n"
    else:  # the control: without the filter the line is there
        assert "oneDNN custom operations are on" in res.stderr, res.stderr
