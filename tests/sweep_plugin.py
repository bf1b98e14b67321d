"""Methods the sweep tests register (imported by name, in subprocesses and Ray workers too): EAP with a
pause (so a test can kill a sweep mid-way) and EAP whose first try kills its own process."""

from __future__ import annotations

import os
import time

from circuits.sweep import register_method
from circuits.sweep.methods import adapter


@register_method("slow-eap")
def slow_eap(model, task, params):
    """EAP top-n after sleeping `sleep` seconds."""
    time.sleep(params["sleep"])
    return adapter("eap")(model, task, {"top_n": params["top_n"]})


@register_method("eap-dies-once")
def eap_dies_once(model, task, params):
    """Kills its own process (no cleanup, like a crash) unless the file `marker` exists, which it creates first;
    then EAP top-n."""
    if not os.path.exists(params["marker"]):
        open(params["marker"], "w").close()
        os._exit(1)
    return adapter("eap")(model, task, {"top_n": params["top_n"]})
