"""Serving an export in a fresh process that cannot import tf_moe."""

import os
import subprocess
import sys
import textwrap

import numpy as np


def serve_in_fresh_process(export_dir, probe, expected, work_dir):
    """Loads `export_dir` in a new Python process where any import of tf_moe
    fails, serves `probe` and checks it against `expected` (atol 1e-5).

    Returns:
        The shape the export served, as printed by that process.
    """
    np.save(os.path.join(work_dir, "probe.npy"), probe)
    np.save(os.path.join(work_dir, "expected.npy"), expected)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["tf_moe"] = None  # any import of tf_moe now fails
        import numpy as np
        import tensorflow as tf
        served = tf.saved_model.load({str(export_dir)!r})
        out = served.serve(tf.constant(np.load("probe.npy"))).numpy()
        np.testing.assert_allclose(out, np.load("expected.npy"), atol=1e-5)
        print("served", out.shape)
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", script], env=env,
                            cwd=str(work_dir), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
