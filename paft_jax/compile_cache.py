"""JAX's persistent compilation cache for a run: each device program is compiled once per run, and a restarted
run (a preempted Spot slice, a rerun that continues) loads the compiled programs instead of compiling them
again (an 8B program takes 1-2.5 minutes to compile).

`compile_cache: auto` (the default) keeps the cache beside the run, `<output_dir>/xla_cache`, on local disk or
gs:// (JAX reads and writes both); a path puts it there (several runs may share one); `off` disables it.  The
entries are keyed by JAX itself: a hash of the program, its compile options, the devices and the jax, jaxlib
and XLA (libtpu) versions, so an entry is only ever used by the same program on the same software.  Every
program is cached, however fast it compiled, and the hits and misses are counted (`jax.monitoring` events) so
that a run can say how many of its programs it loaded.
"""
from __future__ import annotations

import logging
import threading

log = logging.getLogger("paft_jax")

_EVENTS = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "misses"}
_counts = {"hits": 0, "misses": 0}
_lock = threading.Lock()
_listening = False
_current: str | None = None


def cache_dir(setting: str | bool, output_dir: str) -> str | None:
    """Where `compile_cache: <setting>` puts the cache for a run writing to `output_dir` (None: off; YAML reads
    a bare `off` as false)."""
    if setting is False or setting == "off":
        return None
    if setting == "auto":
        return f"{output_dir.rstrip('/')}/xla_cache"
    return setting


def check(setting) -> None:
    if setting is False:
        return
    if not isinstance(setting, str) or not setting:
        raise ValueError(f"compile_cache={setting!r}: expected auto, off or a directory (local or gs://)")


def _count(event: str, **_) -> None:
    key = _EVENTS.get(event)
    if key is not None:
        with _lock:
            _counts[key] += 1


def enable(directory: str) -> None:
    """Point JAX's persistent cache at `directory` (created on first write), caching every program."""
    global _listening, _current
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc
    if not _listening:
        jax.monitoring.register_event_listener(_count)
        _listening = True
    if _current == directory:
        return
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if _current is not None:
        cc.reset_cache()  # JAX opens the cache once per process: a second directory needs a fresh start
    _current = directory  # said at the end of the run (log_stats): a user error before then stays one line


def stats() -> dict[str, int]:
    """Persistent-cache hits and misses so far in this process (programs loaded / compiled and stored)."""
    with _lock:
        return dict(_counts)


def start(setting: str | bool, output_dir: str) -> str | None:
    """Enable the cache a run's `compile_cache` setting names (see `cache_dir`); returns its directory."""
    where = cache_dir(setting, output_dir)
    if where is not None:
        enable(where)
    return where


def log_stats(where: str | None) -> None:
    """One log line at the end of a run: how many of its programs were loaded, how many compiled."""
    if where is not None:
        got = stats()
        log.info("compilation cache: %d programs loaded, %d compiled and stored (%s)", got["hits"], got["misses"],
                 where)

