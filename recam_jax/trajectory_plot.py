"""Pictures of camera trajectories: frusta seen from above and from the side, as an RGB image.

Drawn in the first camera's frame, in metres: from above, right is right and forward is up the
page; from the side, forward is right and up is up. Nine frusta evenly spaced in time, coloured
by frame number, over the grey path of the camera centre; a black dot marks frame 0.
The image goes to a PNG (`write_png`) or to TensorBoard as is
(`SummaryWriter.add_image(tag, render(...), step, dataformats="HWC")`).
"""

from __future__ import annotations

import imageio.v3 as iio
import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_HALF_FOV = np.tan(np.radians(30.0))  # frustum half-width per unit depth: a picture, not a lens
_FRUSTA = 9
_VIEWS = (("from above", 1, 0, "right (m)", "forward (m)"), ("from the side", 0, 2, "forward (m)", "up (m)"))


def in_start_frame(unreal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions (frames, 3) in metres and axes (frames, 3, 3) as rows forward, right, up, in frame 0's camera axes."""
    start_axes = unreal[0, :3, :3]
    positions = (unreal[:, 3, :3] - unreal[0, 3, :3]) @ start_axes.T / 100.0
    return positions, unreal[:, :3, :3] @ start_axes.T


def render(trajectories: dict[str, np.ndarray]) -> np.ndarray:
    """uint8 RGB (height, width, 3): one row per named trajectory (Unreal matrices (frames, 4, 4))."""
    figure, axes = plt.subplots(len(trajectories), 2, figsize=(10, 3.6 * len(trajectories)),
                                squeeze=False, layout="constrained")
    for row, (name, unreal) in zip(axes, trajectories.items()):
        positions, frame_axes = in_start_frame(unreal)
        extent = np.ptp(positions, axis=0).max()
        depth = max(0.3 * extent, 0.5)  # frusta big enough to read, small next to the path
        shown = np.unique(np.linspace(0, len(unreal) - 1, _FRUSTA).round().astype(int))
        frame_colours = plt.Normalize(0, max(len(unreal) - 1, 1))
        for ax, (view, h, v, h_label, v_label) in zip(row, _VIEWS):
            side = 1 if view == "from above" else 2  # the frame axis that spreads the frustum in this view
            ax.plot(positions[:, h], positions[:, v], color="0.6", lw=1)
            for k in shown:
                colour = plt.cm.viridis(frame_colours(k))
                tip = positions[k] + depth * frame_axes[k, 0]
                corners = [tip + s * depth * _HALF_FOV * frame_axes[k, side] for s in (-1, 1)]
                outline = np.array([positions[k], *corners, positions[k]])
                ax.fill(outline[:, h], outline[:, v], color=colour, alpha=0.1)
                ax.plot(outline[:, h], outline[:, v], color=colour, lw=1.5)
            ax.plot(*positions[0, [h, v]], "ko", ms=5)
            _square_limits(ax)
            ax.set(title=f"{name}: {view}", xlabel=h_label, ylabel=v_label, aspect="equal")
            ax.grid(alpha=0.3)
        figure.colorbar(plt.cm.ScalarMappable(frame_colours, "viridis"), ax=row.tolist(), label="frame")
    figure.canvas.draw()
    image = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return image


def _square_limits(ax) -> None:
    """The same span on both axes, so a straight-line move does not squeeze its panel to a strip."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    half = max(x1 - x0, y1 - y0) / 2
    ax.set(xlim=((x0 + x1) / 2 - half, (x0 + x1) / 2 + half), ylim=((y0 + y1) / 2 - half, (y0 + y1) / 2 + half))


def write_png(path: str, trajectories: dict[str, np.ndarray]) -> None:
    """`render` saved as a PNG."""
    iio.imwrite(path, render(trajectories))
