"""A picture of a schedule: the tuned model's weight at each step of an N-step run, as a ComfyUI IMAGE.

ComfyUI images are float tensors ``[batch, height, width, 3]`` in [0, 1]. Drawn with matplotlib (Agg).
"""

from __future__ import annotations

import numpy as np
import torch

from rdt_lib.schedules import Schedule

__all__ = ["plot_schedule"]


def plot_schedule(schedule: Schedule, num_steps: int, width: int = 512, height: int = 320) -> torch.Tensor:
    """A ``[1, height, width, 3]`` float image in [0, 1]: bars of ``w(i, N)`` for step index ``i = 0..N-1``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    weights = schedule.weights(num_steps)
    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(num_steps), weights, width=0.9, color="#3b7dd8")
    ax.set_ylim(0.0, 1.05)
    ax.set_xlim(-0.6, num_steps - 0.4)
    ax.set_xlabel("step index (0 = noisiest)")
    ax.set_ylabel("tuned weight w")
    ax.set_title(f"{schedule} over {num_steps} steps")
    fig.tight_layout()
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba(), dtype=np.uint8)[..., :3]
    return torch.from_numpy(rgba.astype(np.float32) / 255.0).unsqueeze(0)
