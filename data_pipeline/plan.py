"""The prepare plan: what one output folder holds, fixed by its first run, checked by every later run and host.

    OUT/plan.json   settings (frame size, split and shard sizes, caption file hash, encoder
                    identities), every scene with the fingerprint of its files, each shard's scenes

Shards are named by position (train-00003), so a resume under a different scene list or encoder
would silently mix two datasets: a scene added while an archive was still extracting shifts every
later shard, and a val scene can land in a train shard. Every run therefore computes its own plan
and refuses to continue under a different one, saying what changed. `--replan` makes the new plan
the output's plan: a shard made under the old one counts as complete only if it holds the same
content under the new one (its index file names a hash of that content, `shard_key`); the others are
rewritten.

Process 0 writes the plan; the other processes wait for it and check their own directory listing
against it, so hosts that see different files stop instead of writing disagreeing shards.
"""

from __future__ import annotations

import collections
import hashlib
import json
import time

from data_pipeline import shards
from recam_jax import storage

PLAN = "plan.json"
FORMAT = "recam_jax.prepare_plan.v1"
_SHOWN = 5  # scene ids named per kind of change; the rest are counted


class PlanError(ValueError):
    """A plan that disagrees with the output's plan: the message says what changed."""


def scene_fingerprints(split_dir: str, scene_ids: list[str]) -> dict[str, str]:
    """Scene id -> hash of the names and byte sizes of the files below it (one listing of the split).

    Sizes, not contents: hashing 136K videos would read the whole dataset; a truncated or
    re-extracted file, or a file added or removed, changes the fingerprint."""
    files = collections.defaultdict(list)
    for name, size in storage.file_sizes(split_dir).items():
        parts = name.split("/", 2)  # lens folder, scene folder, path inside the scene
        if len(parts) == 3:
            files["/".join(parts[:2])].append(f"{parts[2]} {size}")
    return {scene_id: hashlib.sha256("\n".join(sorted(files[scene_id])).encode()).hexdigest()[:16]
            for scene_id in scene_ids}  # fmt: skip


def make_plan(settings: dict, fingerprints: dict[str, str], shards: dict[str, list[list[str]]]) -> dict:
    return {"format": FORMAT, "settings": settings, "scenes": fingerprints, "shards": shards}


def plan_id(plan: dict) -> str:
    """A short hash of the whole plan."""
    return _hash(plan)


def shard_key(plan: dict, split: str, shard: int) -> str:
    """A hash of what shard `shard` of `split` holds under `plan`: the settings and its scenes with
    their fingerprints. Its index file records it, so a shard is complete only if it was made with
    this very content; after `--replan`, the shards whose content did not change are kept."""
    scenes = [[scene_id, plan["scenes"][scene_id]] for scene_id in plan["shards"][split][shard]]
    return _hash({"settings": plan["settings"], "split": split, "scenes": scenes})


def _hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def differences(old: dict, new: dict) -> list[str]:
    """What changed from plan `old` to plan `new`, one line per kind of change (empty: the same plan)."""
    changes = [f"{key}: {old['settings'].get(key)!r} -> {new['settings'].get(key)!r}"
               for key in sorted(old["settings"].keys() | new["settings"].keys())
               if old["settings"].get(key) != new["settings"].get(key)]  # fmt: skip
    before, after = old["scenes"], new["scenes"]
    changed = {scene for scene in before.keys() & after.keys() if before[scene] != after[scene]}
    for kind, ids in (("added", after.keys() - before.keys()), ("missing", before.keys() - after.keys()),
                      ("changed (file names or sizes)", changed)):  # fmt: skip
        if ids:
            shown = ", ".join(sorted(ids)[:_SHOWN]) + (f" and {len(ids) - _SHOWN} more" if len(ids) > _SHOWN else "")
            changes.append(f"{len(ids)} scene(s) {kind}: {shown}")
    if not changes and old != new:
        changes.append("the shard assignment differs")
    return changes


def agree(output_dir: str, plan: dict, process_index: int, replan: bool, wait_s: float, poll_s: float = 2.0) -> str:
    """Makes `plan` the output's plan or checks it is; returns its id. Process 0 writes it (on the
    first run, or with `replan`), the others wait up to `wait_s` for process 0's and compare."""
    path = storage.join(output_dir, PLAN)
    if process_index == 0:
        changes = differences(storage.read_json(path), plan) if storage.exists(path) else []
        if changes and not replan:
            raise PlanError(_refusal(path, "this run", changes))
        if changes or not storage.exists(path):
            manifest = storage.join(output_dir, shards.MANIFEST)
            if storage.exists(manifest):
                storage.remove(manifest)  # the dataset is incomplete again until the new shards are written
            storage.write_json(path, plan)
        return plan_id(plan)
    deadline = time.monotonic() + wait_s
    while True:
        changes = differences(storage.read_json(path), plan) if storage.exists(path) else None
        if changes == []:
            return plan_id(plan)
        # With replan, process 0 may not have written the new plan yet: keep waiting for it.
        if time.monotonic() > deadline or (changes and not replan):
            if changes is None:
                raise PlanError(f"{path}: process 0 wrote no plan within {wait_s:.0f} s")
            raise PlanError(_refusal(path, f"process {process_index}", changes))
        time.sleep(poll_s)


def _refusal(path: str, who: str, changes: list[str]) -> str:
    return (f"{path}: {who} makes a different plan than the one this output was made under:\n  "
            + "\n  ".join(changes)
            + "\nRerun every process with --replan to start this output over under the new plan, or choose another"
            " --output_dir; if only some hosts differ, make their input roots identical first.")  # fmt: skip
