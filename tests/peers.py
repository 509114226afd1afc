"""The peers' code in ../shared/peers (optional), loaded by file path for parity tests and benchmarks.

The official ReCamMaster files import their package (`diffsynth`, which pulls in transformers,
lightning and more); the two used here need only torch, einops and, for the DiT, `.utils`'s key-hash
helper, so each is loaded on its own under a private package name with a stub `.utils`.
"""

import contextlib
import importlib.util
import os
import sys
import types

PEERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "peers")
RECAMMASTER = os.path.join(PEERS, "recammaster")
MAXDIFFUSION_SRC = os.path.join(PEERS, "maxdiffusion", "src")


@contextlib.contextmanager
def official_modules(*relative_paths: str):
    """The official ReCamMaster files at these paths (under ../shared/peers/recammaster) as modules,
    registered while the context is open. Raises FileNotFoundError when ../shared/peers is absent."""
    package = types.ModuleType("official_recammaster")
    package.__path__ = []
    utils = types.ModuleType("official_recammaster.utils")
    utils.hash_state_dict_keys = lambda state_dict: None  # used only by the DiT's key-hash config lookup
    added = {"official_recammaster": package, "official_recammaster.utils": utils}
    modules = []
    try:
        sys.modules.update(added)
        for relative_path in relative_paths:
            source = os.path.join(RECAMMASTER, relative_path)
            if not os.path.exists(source):
                raise FileNotFoundError(f"the official ReCamMaster source is not at {source} (../shared/peers is optional)")
            name = "official_recammaster." + os.path.splitext(os.path.basename(source))[0]
            spec = importlib.util.spec_from_file_location(name, source)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = added[name] = module
            spec.loader.exec_module(module)
            modules.append(module)
        yield modules
    finally:
        for name in added:
            sys.modules.pop(name, None)


WAN_VIDEO_DIT = os.path.join("diffsynth", "models", "wan_video_dit.py")
FLOW_MATCH = os.path.join("diffsynth", "schedulers", "flow_match.py")
