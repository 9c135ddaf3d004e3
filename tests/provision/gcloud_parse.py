"""Run many gcloud command lines through the real gcloud CLI parser in ONE process.

Usage: python3 -S gcloud_parse.py SDK_LIB_DIR [OUT] < commands.json
       python3 -S gcloud_parse.py SDK_LIB_DIR OUT --batch-job FILE...

commands.json is a JSON list of argv lists (without the leading "gcloud"). The real CLI
(googlecloudsdk.gcloud_main) is built once, each command's module is loaded once, and every command is
executed in a forked child (cheap, and calliope keeps per-command parser state that must not leak from one
command to the next), with an empty configuration folder (CLOUDSDK_CONFIG, set by the caller). Each result is
{"argv": [...], "code": int, "stderr": "..."}. A command whose flags are valid stops at
"You do not currently have an active account selected" (exit 1); a rejected flag exits 2.

This file runs under the Python that gcloud itself uses, not the project's virtual environment,
so it imports nothing from the project and is not linted as project code.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from typing import Any


def _setup_path(sdk_lib: str) -> None:
    third_party = os.path.join(sdk_lib, "third_party")
    sys.path.insert(0, sdk_lib)
    if os.path.isdir(third_party):
        sys.path.insert(0, third_party)


def _setup(sdk_lib: str) -> Any:
    _setup_path(sdk_lib)
    from googlecloudsdk import gcloud_main  # type: ignore[import-not-found]

    return gcloud_main.CreateCLI([])


def _warm(cli: Any, argv: list[str]) -> None:
    """Loads the command's module in this (parent) process, so that forked children share it."""
    top = cli._TopElement()
    words: list[str] = []
    for word in argv:
        if word.startswith("-"):
            break
        words.append(word)
        try:
            if top.LoadSubElementByPath(list(words)) is None:
                return
        except Exception:
            return


def _run_one(cli: Any, argv: list[str]) -> dict[str, Any]:
    """Executes one command line in a forked child: calliope keeps per-command parser state (a second
    `--metadata` in the same process is "specified multiple times"), so every command gets a fresh copy."""
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as err_file, tempfile.TemporaryFile() as out_file:
        pid = os.fork()
        if pid == 0:  # child
            code = 0
            try:
                os.dup2(err_file.fileno(), 2)
                os.dup2(out_file.fileno(), 1)
                cli.Execute(list(argv))
            except SystemExit as exc:  # gcloud exits through sys.exit for usage and runtime errors
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException as exc:
                code = 99
                os.write(2, (f"HARNESS: unexpected {exc!r}\n").encode())
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        err_file.seek(0)
        stderr = err_file.read().decode("utf-8", "replace")
    return {"argv": argv, "code": code, "stderr": stderr}


def _unrecognized(msg: Any, path: str) -> list[str]:
    """Field paths that the API's message classes do not know (misspelt keys, invalid enum values)."""
    from apitools.base.protorpclite import messages  # type: ignore[import-not-found]

    found = [f"{path}.{name}: unknown field or value" for name in msg.all_unrecognized_fields()]
    for field in msg.all_fields():
        value = msg.get_assigned_value(field.name)
        if isinstance(field, messages.MessageField) and value is not None:
            for i, item in enumerate(value if field.repeated else [value]):
                if isinstance(item, messages.Message):
                    found += _unrecognized(item, f"{path}.{field.name}[{i}]")
    return found


_INT = re.compile(r"-?[0-9]+\Z")


def _value_problems(field: Any, value: Any, path: str) -> list[str]:
    """One JSON value against one message field (proto3 JSON: 64-bit integers may be strings)."""
    from apitools.base.protorpclite import messages  # type: ignore[import-not-found]

    if value is None:
        return [f"{path}: null"]
    if isinstance(field, messages.MessageField):
        return _json_problems(field.message_type, value, path)
    if isinstance(field, messages.EnumField):
        if not isinstance(value, str) or value not in field.type.names():
            return [f"{path}: {value!r} is not one of {sorted(field.type.names())}"]
        return []
    if isinstance(field, messages.BooleanField):
        ok = isinstance(value, bool)
    elif isinstance(field, messages.IntegerField):
        ok = (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, str) and bool(_INT.match(value))
        )
    elif isinstance(field, messages.FloatField):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(field, (messages.StringField, messages.BytesField)):
        ok = isinstance(value, str)
    else:
        return [f"{path}: field type {type(field).__name__} is not checked by this harness"]
    return [] if ok else [f"{path}: {type(value).__name__} {value!r} for a {type(field).__name__}"]


def _json_problems(cls: Any, value: Any, path: str) -> list[str]:
    """Walks the JSON next to the message class: every key a field, every value of the field's JSON type."""
    from apitools.base.py import encoding, extra_types  # type: ignore[import-not-found]

    if cls in (extra_types.JsonValue, extra_types.JsonObject, extra_types.JsonArray):
        return []
    if not isinstance(value, dict):
        return [f"{path}: {type(value).__name__} {value!r} where an object ({cls.__name__}) belongs"]
    names = [f.name for f in cls.all_fields()]
    if names == ["additionalProperties"]:  # a JSON map (labels, environment variables)
        item = cls.field_by_name("additionalProperties").message_type.field_by_name("value")
        return [p for key, v in value.items() for p in _value_problems(item, v, f"{path}.{key}")]
    problems = []
    for key, v in value.items():
        name = encoding.GetCustomJsonFieldMapping(cls, json_name=key) or key
        if name not in names:
            problems.append(f"{path}.{key}: unknown field of {cls.__name__}")
            continue
        field = cls.field_by_name(name)
        if field.repeated:
            if not isinstance(v, list):
                problems.append(f"{path}.{key}: {type(v).__name__} where a list belongs")
                continue
            for i, item in enumerate(v):
                problems += _value_problems(field, item, f"{path}.{key}[{i}]")
        else:
            problems += _value_problems(field, v, f"{path}.{key}")
    return problems


def _check_batch_jobs(sdk_lib: str, paths: list[str]) -> list[dict[str, Any]]:
    """Decodes each file with gcloud's own Batch v1 Job message class, as `gcloud batch jobs submit` does, and
    lists every problem: a value apitools refuses, a field or enum value it does not know (kept as
    "unrecognized", recursively), a JSON value of the wrong type (which apitools may drop or coerce)."""
    _setup_path(sdk_lib)
    from apitools.base.py import encoding  # type: ignore[import-not-found]
    from googlecloudsdk.generated_clients.apis.batch.v1 import batch_v1_messages  # type: ignore[import-not-found]

    results = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        problems: list[str] = []
        try:
            job = encoding.JsonToMessage(batch_v1_messages.Job, text)
            problems += _unrecognized(job, "job")
        except Exception as exc:
            problems.append(f"cannot decode: {exc!r}")
        problems += _json_problems(batch_v1_messages.Job, json.loads(text), "job")
        results.append({"path": path, "problems": sorted(set(problems))})
    return results


def main() -> int:
    sdk_lib = sys.argv[1]
    if len(sys.argv) > 3 and sys.argv[3] == "--batch-job":
        results: list[dict[str, Any]] = _check_batch_jobs(sdk_lib, sys.argv[4:])
    else:
        commands = json.load(sys.stdin)
        cli = _setup(sdk_lib)
        for argv in commands:
            _warm(cli, argv)
        results = [_run_one(cli, argv) for argv in commands]
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w", encoding="utf-8") as out:
            json.dump(results, out)
    else:
        json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
