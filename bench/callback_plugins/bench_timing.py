# -*- coding: utf-8 -*-
# Benchmark helper, not part of the collection: per-task and per-host timings of a playbook run.
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
name: bench_timing
type: aggregate
short_description: Write per-task, per-host timings of a run as JSON (for bench/)
description:
  - Records, for every task, when the strategy started it and, for every host, when its worker
    started and when its result came back. Writes one JSON document to the file named by the
    environment variable E(BENCH_TIMING_OUT) at the end of the run.
  - Enable with C(ANSIBLE_CALLBACK_PLUGINS=bench/callback_plugins ANSIBLE_CALLBACKS_ENABLED=bench_timing).
requirements:
  - environment variable BENCH_TIMING_OUT
"""

import json
import os
import time

from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "bench_timing"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args, **kwargs):
        super(CallbackModule, self).__init__(*args, **kwargs)
        self._t0 = time.monotonic()
        self._tasks = {}  # uuid -> record
        self._order = []
        self._running = {}  # (task uuid, host) -> start

    def _now(self):
        return round(time.monotonic() - self._t0, 6)

    def _task(self, task):
        uuid = task._uuid
        record = self._tasks.get(uuid)
        if record is None:
            role = getattr(task, "_role", None)
            record = {"name": task.get_name(), "action": task.action, "role": role.get_name() if role else None,
                      "path": task.get_path(), "started": self._now(), "hosts": {}}
            self._tasks[uuid] = record
            self._order.append(uuid)
        return record

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._task(task)

    def v2_playbook_on_handler_task_start(self, task):
        self._task(task)

    def v2_runner_on_start(self, host, task):
        self._running[(task._uuid, host.get_name())] = self._now()
        self._task(task)

    def _end(self, result, status):
        task = result._task
        host = result._host.get_name()
        record = self._task(task)
        start = self._running.pop((task._uuid, host), None)
        end = self._now()
        entry = record["hosts"].setdefault(host, [])
        entry.append({"start": start, "end": end, "status": status})

    def v2_runner_on_ok(self, result):
        self._end(result, "ok")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._end(result, "failed")

    def v2_runner_on_skipped(self, result):
        self._end(result, "skipped")

    def v2_runner_on_unreachable(self, result):
        self._end(result, "unreachable")

    def v2_playbook_on_stats(self, stats):
        path = os.environ.get("BENCH_TIMING_OUT")
        if not path:
            return
        document = {"total": self._now(), "tasks": [self._tasks[u] for u in self._order]}
        with open(path, "w") as handle:
            json.dump(document, handle)
