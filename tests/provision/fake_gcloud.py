"""A stand-in for the ``gcloud`` CLI, for the idempotency and ordering tests of gcp/provision.sh.

It keeps a small model of a Google Cloud project in a JSON file (``FAKE_GCLOUD_STATE``), appends every call to
``FAKE_GCLOUD_LOG`` (one JSON list of arguments per line) and answers the commands the scripts use the way the
real CLI does: a describe of something missing exits 1 with the real "not found" wording on stderr, a list
prints one value row per resource, a create of something that exists fails with "already exists".

``FAKE_GCLOUD_FAIL`` (optional) is a command prefix such as ``compute disks describe``: that command then
fails with PERMISSION_DENIED, as the real one does without the right role; with ``FAKE_GCLOUD_FAIL_TIMES=N``
only its first N calls fail (IAM's eventual consistency right after a service account is created).
``FAKE_GCLOUD_PROJECT`` is the current project that ``gcloud config get-value project`` prints (unset: none).

A VM created with the metadata ``triplet-bake=true`` (the image builder of ``provision.sh image``) powers
itself off like the real one: it is RUNNING for ``FAKE_GCLOUD_BAKE_POLLS`` (default 2) describes, then
TERMINATED (``never``: it stays RUNNING). Images are kept per family; a VM whose boot image is a family of
this project can only be created once that family has an image.

Only the command lines the scripts generate are understood: anything else exits 3 so that a test notices.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

State = dict[str, Any]


def _empty_state() -> State:
    return {
        "services": [],
        "project_metadata": {},
        "buckets": {},
        "objects": {},
        "service_accounts": [],
        "roles": {},
        "project_iam": [],
        "disks": {},
        "snapshots": [],
        "templates": {},
        "migs": {},
        "instances": {},
        "operations": [],
        "jobs": {},
        "images": {},
    }


def _md5(data: bytes) -> str:
    """Cloud Storage's object checksum (an integrity check here, not a security one)."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


class GcloudError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _split(args: list[str]) -> tuple[list[str], dict[str, str]]:
    words: list[str] = []
    flags: dict[str, str] = {}
    for a in args:
        if a.startswith("--"):
            key, _, value = a[2:].partition("=")
            if key in flags and key in ("disk", "stateful-disk"):
                flags[key] += "\n" + value
            else:
                flags[key] = value
        else:
            words.append(a)
    return words, flags


COMMANDS = [
    ("config", "get-value"),
    ("services", "list"),
    ("services", "enable"),
    ("compute", "project-info", "describe"),
    ("compute", "project-info", "add-metadata"),
    ("storage", "buckets", "describe"),
    ("storage", "buckets", "create"),
    ("storage", "buckets", "update"),
    ("storage", "buckets", "get-iam-policy"),
    ("storage", "buckets", "add-iam-policy-binding"),
    ("storage", "buckets", "remove-iam-policy-binding"),
    ("storage", "hash"),
    ("storage", "cp"),
    ("storage", "ls"),
    ("storage", "cat"),
    ("storage", "rm"),
    ("iam", "service-accounts", "describe"),
    ("iam", "service-accounts", "create"),
    ("iam", "service-accounts", "delete"),
    ("iam", "roles", "describe"),
    ("iam", "roles", "create"),
    ("iam", "roles", "undelete"),
    ("iam", "roles", "delete"),
    ("projects", "get-iam-policy"),
    ("projects", "add-iam-policy-binding"),
    ("projects", "remove-iam-policy-binding"),
    ("compute", "disks", "describe"),
    ("compute", "disks", "create"),
    ("compute", "disks", "delete"),
    ("compute", "disks", "snapshot"),
    ("compute", "snapshots", "describe"),
    ("compute", "snapshots", "delete"),
    ("compute", "instance-templates", "describe"),
    ("compute", "instance-templates", "create"),
    ("compute", "instance-templates", "list"),
    ("compute", "instance-templates", "delete"),
    ("compute", "instance-groups", "managed", "describe"),
    ("compute", "instance-groups", "managed", "create"),
    ("compute", "instance-groups", "managed", "set-instance-template"),
    ("compute", "instance-groups", "managed", "update-instances"),
    ("compute", "instance-groups", "managed", "list-instances"),
    ("compute", "instance-groups", "managed", "delete"),
    ("compute", "instances", "describe"),
    ("compute", "instances", "create"),
    ("compute", "instances", "delete"),
    ("compute", "instances", "start"),
    ("compute", "images", "describe-from-family"),
    ("compute", "images", "create"),
    ("compute", "images", "list"),
    ("compute", "images", "delete"),
    ("compute", "operations", "list"),
    ("batch", "jobs", "describe"),
    ("batch", "jobs", "submit"),
    ("batch", "jobs", "delete"),
    ("batch", "tasks", "list"),
]


class Fake:
    def __init__(self, state: State) -> None:
        self.s = state
        self.out: list[str] = []

    # --- helpers --------------------------------------------------------------------------------------------
    def emit(self, *rows: str) -> None:
        self.out.extend(rows)

    @staticmethod
    def not_found(cmd: str, what: str) -> GcloudError:
        return GcloudError(
            1, f"ERROR: ({cmd}) Could not fetch resource:\n - The resource '{what}' was not found\n"
        )

    @staticmethod
    def exists(cmd: str, what: str) -> GcloudError:
        return GcloudError(
            1, f"ERROR: ({cmd}) Could not create resource:\n - The resource '{what}' already exists\n"
        )

    def project(self, flags: dict[str, str]) -> str:
        project = flags.get("project", "")
        if not project:
            raise GcloudError(1, "ERROR: (gcloud) The required property [project] is not currently set.\n")
        return project

    @staticmethod
    def zkey(flags: dict[str, str], name: str) -> str:
        zone = flags.get("zone", "")
        if not zone:
            raise GcloudError(2, "ERROR: (gcloud) argument --zone: required\n")
        return f"{zone}/{name}"

    def bucket_of(self, uri: str, cmd: str) -> tuple[str, str]:
        if not uri.startswith("gs://"):
            raise GcloudError(3, f"fake gcloud: not a gs:// URI: {uri}")
        bucket, _, path = uri[5:].partition("/")
        if bucket not in self.s["buckets"]:
            raise GcloudError(1, f"ERROR: ({cmd}) gs://{bucket} not found: 404.\n")
        return bucket, path

    # --- dispatcher -----------------------------------------------------------------------------------------
    def run(self, argv: list[str]) -> None:
        for cmd in COMMANDS:
            if tuple(argv[: len(cmd)]) == cmd:
                words, flags = _split(argv[len(cmd) :])
                name = "gcloud." + ".".join(cmd)
                fail = os.environ.get("FAKE_GCLOUD_FAIL", "")
                if fail and " ".join(cmd).startswith(fail):
                    times = int(os.environ.get("FAKE_GCLOUD_FAIL_TIMES", "0"))  # 0: always
                    failed = self.s.setdefault("failures", {}).get(fail, 0)
                    if times == 0 or failed < times:
                        self.s["failures"][fail] = failed + 1
                        raise GcloudError(1, f"ERROR: ({name}) PERMISSION_DENIED: permission denied (403)\n")
                handler = getattr(self, "cmd_" + "_".join(c.replace("-", "_") for c in cmd))
                handler(name, words, flags)
                return
        raise GcloudError(3, f"fake gcloud: unsupported command: {' '.join(argv)}\n")

    # --- config -------------------------------------------------------------------------------------------
    def cmd_config_get_value(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        if words != ["project"]:
            raise GcloudError(3, f"fake gcloud: unsupported property {words}")
        project = os.environ.get("FAKE_GCLOUD_PROJECT", "")
        if project:
            self.emit(project)
        else:
            sys.stderr.write("(unset)\n")  # what the real CLI says, with exit 0 and nothing on stdout

    # --- services -------------------------------------------------------------------------------------------
    def cmd_services_list(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        self.project(flags)
        self.emit(*self.s["services"])

    def cmd_services_enable(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        self.project(flags)
        for api in words:
            if api not in self.s["services"]:
                self.s["services"].append(api)

    def cmd_compute_project_info_describe(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        self._need_api("compute.googleapis.com", name)
        for k, v in sorted(self.s["project_metadata"].items()):
            self.emit(f"{k}\t{v}")

    def cmd_compute_project_info_add_metadata(
        self, name: str, words: list[str], flags: dict[str, str]
    ) -> None:
        self._need_api("compute.googleapis.com", name)
        for item in flags["metadata"].split(","):
            k, _, v = item.partition("=")
            self.s["project_metadata"][k] = v

    def _need_api(self, api: str, name: str) -> None:
        if api not in self.s["services"]:
            raise GcloudError(1, f"ERROR: ({name}) PERMISSION_DENIED: {api} has not been used in project\n")

    # --- buckets --------------------------------------------------------------------------------------------
    def cmd_storage_buckets_describe(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        bucket, _ = self.bucket_of(words[0], name)
        b = self.s["buckets"][bucket]
        fmt = flags.get("format", "")
        if fmt == "value(labels.triplet_lifecycle)":
            self.emit(b["labels"].get("triplet_lifecycle", ""))
        elif fmt == "value(name)":
            self.emit(bucket)
        else:
            raise GcloudError(3, f"fake gcloud: unsupported format {fmt}")

    def cmd_storage_buckets_create(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        self.project(flags)
        bucket = words[0][5:]
        if bucket in self.s["buckets"]:
            raise GcloudError(
                1,
                f"ERROR: ({name}) HTTPError 409: Your previous request to create the named bucket "
                "succeeded and you already own it.\n",
            )
        for required in ("uniform-bucket-level-access", "location"):
            if required not in flags:
                raise GcloudError(3, f"fake gcloud: bucket created without --{required}")
        self.s["buckets"][bucket] = {"labels": {}, "lifecycle": None, "versioning": False, "iam": []}

    def cmd_storage_buckets_update(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        bucket, _ = self.bucket_of(words[0], name)
        b = self.s["buckets"][bucket]
        if "lifecycle-file" in flags:
            b["lifecycle"] = json.loads(Path(flags["lifecycle-file"]).read_text())
        if "versioning" in flags:
            b["versioning"] = True
        if "no-versioning" in flags:
            b["versioning"] = False
        for item in flags.get("update-labels", "").split(","):
            if item:
                k, _, v = item.partition("=")
                b["labels"][k] = v

    def cmd_storage_buckets_get_iam_policy(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        bucket, _ = self.bucket_of(words[0], name)
        for role, member in self.s["buckets"][bucket]["iam"]:
            self.emit(f"{role}\t{member}")

    def cmd_storage_buckets_add_iam_policy_binding(
        self, name: str, words: list[str], flags: dict[str, str]
    ) -> None:
        bucket, _ = self.bucket_of(words[0], name)
        pair = [flags["role"], flags["member"]]
        iam = self.s["buckets"][bucket]["iam"]
        if pair not in iam:
            iam.append(pair)

    def cmd_storage_buckets_remove_iam_policy_binding(
        self, name: str, words: list[str], flags: dict[str, str]
    ) -> None:
        bucket, _ = self.bucket_of(words[0], name)
        pair = [flags["role"], flags["member"]]
        iam = self.s["buckets"][bucket]["iam"]
        if pair not in iam:
            raise GcloudError(
                1, f"ERROR: ({name}) Policy binding with the specified principal and role not found!\n"
            )
        iam.remove(pair)

    # --- objects --------------------------------------------------------------------------------------------
    def _objects_under(self, prefix: str) -> list[str]:
        return sorted(u for u in self.s["objects"] if u.startswith(prefix))

    def cmd_storage_hash(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        target = words[0]
        if target.startswith("gs://"):
            self.bucket_of(target, name)
            if target not in self.s["objects"]:
                raise GcloudError(
                    1, f"ERROR: ({name}) The following URLs matched no objects or files:\n{target}\n"
                )
            self.emit(self.s["objects"][target]["md5"])
        else:
            self.emit(_md5(Path(target).read_bytes()))

    def cmd_storage_cp(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        src, dst = words
        self.bucket_of(dst, name)
        data = Path(src).read_bytes()
        self.s["objects"][dst] = {
            "md5": _md5(data),
            "text": data.decode("utf-8", "replace"),
        }

    def cmd_storage_ls(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        self.bucket_of(words[0], name)
        found = self._objects_under(words[0])
        if not found:
            raise GcloudError(1, f"ERROR: ({name}) One or more URLs matched no objects.\n")
        self.emit(*found)

    def cmd_storage_cat(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        self.bucket_of(words[0], name)
        if words[0] not in self.s["objects"]:
            raise GcloudError(
                1, f"ERROR: ({name}) The following URLs matched no objects or files:\n-{words[0]}\n"
            )
        self.emit(self.s["objects"][words[0]]["text"].rstrip("\n"))

    def cmd_storage_rm(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        target = words[0]
        bucket, path = self.bucket_of(target, name)
        for uri in self._objects_under(target):
            del self.s["objects"][uri]
        if not path:
            del self.s["buckets"][bucket]

    # --- identity -------------------------------------------------------------------------------------------
    def cmd_iam_service_accounts_describe(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        if words[0] not in self.s["service_accounts"]:
            raise GcloudError(1, f"ERROR: ({name}) NOT_FOUND: Unknown service account\n")
        self.emit(words[0])

    def cmd_iam_service_accounts_create(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        email = f"{words[0]}@{self.project(flags)}.iam.gserviceaccount.com"
        if email in self.s["service_accounts"]:
            raise GcloudError(1, f"ERROR: ({name}) ALREADY_EXISTS: Service account {email} already exists\n")
        self.s["service_accounts"].append(email)

    def cmd_iam_service_accounts_delete(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        if words[0] not in self.s["service_accounts"]:
            raise GcloudError(1, f"ERROR: ({name}) NOT_FOUND: Unknown service account\n")
        self.s["service_accounts"].remove(words[0])

    def cmd_iam_roles_describe(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        role = self.s["roles"].get(words[0])
        if role is None:
            raise GcloudError(
                1,
                f"ERROR: ({name}) NOT_FOUND: The role named "
                f"projects/{self.project(flags)}/roles/{words[0]} was not found.\n",
            )
        self.emit("True" if role["deleted"] else "")

    def cmd_iam_roles_create(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        if words[0] in self.s["roles"]:
            raise GcloudError(
                1, f"ERROR: ({name}) ALREADY_EXISTS: A role named {words[0]} in projects/x already exists.\n"
            )
        self.s["roles"][words[0]] = {"deleted": False, "permissions": flags["permissions"].split(",")}

    def cmd_iam_roles_undelete(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        self.s["roles"][words[0]]["deleted"] = False

    def cmd_iam_roles_delete(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        self.s["roles"][words[0]]["deleted"] = True

    def cmd_projects_get_iam_policy(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        for role, member, title in self.s["project_iam"]:
            self.emit(f"{role}\t{member}\t{title}")

    def cmd_projects_add_iam_policy_binding(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        cond = flags.get("condition", "")
        if not cond:
            raise GcloudError(3, "fake gcloud: add-iam-policy-binding without --condition would prompt")
        title = ""
        if cond != "None":
            for part in cond.split(","):
                k, _, v = part.partition("=")
                if k == "title":
                    title = v
        row = [flags["role"], flags["member"], title]
        if row not in self.s["project_iam"]:
            self.s["project_iam"].append(row)

    def cmd_projects_remove_iam_policy_binding(
        self, name: str, words: list[str], flags: dict[str, str]
    ) -> None:
        rows = [r for r in self.s["project_iam"] if r[0] == flags["role"] and r[1] == flags["member"]]
        if not rows:
            raise GcloudError(
                1, f"ERROR: ({name}) Policy binding with the specified principal and role not found!\n"
            )
        for r in rows:
            self.s["project_iam"].remove(r)

    # --- disks ----------------------------------------------------------------------------------------------
    def cmd_compute_disks_describe(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        key = self.zkey(flags, words[0])
        disk = self.s["disks"].get(key)
        if disk is None:
            raise self.not_found(name, f"projects/{self.project(flags)}/zones/{key.replace('/', '/disks/')}")
        if flags.get("format") == "value(sizeGb,type.basename())":
            self.emit(f"{disk['size']}\t{disk['type']}")
        else:
            self.emit(words[0])

    def cmd_compute_disks_create(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        self._need_api("compute.googleapis.com", name)
        key = self.zkey(flags, words[0])
        if key in self.s["disks"]:
            raise self.exists(name, key)
        self.s["disks"][key] = {
            "size": flags["size"].removesuffix("GB"),
            "type": flags["type"],
            "source": flags.get("source-snapshot", ""),
        }

    def cmd_compute_disks_delete(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        key = self.zkey(flags, words[0])
        if key not in self.s["disks"]:
            raise self.not_found(name, key)
        for inst in self.s["instances"].values():
            if inst["zone"] == flags["zone"]:
                raise GcloudError(1, f"ERROR: ({name}) The disk resource is already being used\n")
        del self.s["disks"][key]

    def cmd_compute_disks_snapshot(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        key = self.zkey(flags, words[0])
        if key not in self.s["disks"]:
            raise self.not_found(name, key)
        self.s["snapshots"].append(flags["snapshot-names"])

    def cmd_compute_snapshots_describe(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        if words[0] not in self.s["snapshots"]:
            raise self.not_found(name, f"projects/x/global/snapshots/{words[0]}")
        self.emit("READY")

    def cmd_compute_snapshots_delete(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        self.s["snapshots"].remove(words[0])

    # --- templates, groups, instances ----------------------------------------------------------------------
    def cmd_compute_instance_templates_describe(
        self, name: str, words: list[str], flags: dict[str, str]
    ) -> None:
        if words[0] not in self.s["templates"]:
            raise self.not_found(name, f"projects/{self.project(flags)}/global/instanceTemplates/{words[0]}")
        self.emit(words[0])

    def cmd_compute_instance_templates_create(
        self, name: str, words: list[str], flags: dict[str, str]
    ) -> None:
        if words[0] in self.s["templates"]:
            raise self.exists(name, words[0])
        if "restart-on-failure" in flags and flags.get("provisioning-model") == "SPOT":
            raise GcloudError(
                1,
                f"ERROR: ({name}) Scheduling must have preemptible be false when AutomaticRestart is true.\n",
            )
        self.s["templates"][words[0]] = flags

    def cmd_compute_instance_templates_list(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        prefix = flags.get("filter", "").removeprefix("name~^")
        self.emit(*sorted(t for t in self.s["templates"] if t.startswith(prefix)))

    def cmd_compute_instance_templates_delete(
        self, name: str, words: list[str], flags: dict[str, str]
    ) -> None:
        if words[0] not in self.s["templates"]:
            raise self.not_found(name, words[0])
        for mig in self.s["migs"].values():
            if mig["template"] == words[0]:
                raise GcloudError(
                    1, f"ERROR: ({name}) The instance_template resource is already being used\n"
                )
        del self.s["templates"][words[0]]

    def cmd_compute_instance_groups_managed_describe(
        self, name: str, words: list[str], flags: dict[str, str]
    ) -> None:
        key = self.zkey(flags, words[0])
        mig = self.s["migs"].get(key)
        if mig is None:
            raise self.not_found(
                name, f"projects/{self.project(flags)}/zones/{key.replace('/', '/instanceGroupManagers/')}"
            )
        if flags.get("format") == "value(instanceTemplate.basename())":
            self.emit(mig["template"])
        else:
            self.emit(words[0])

    def cmd_compute_instance_groups_managed_create(
        self, name: str, words: list[str], flags: dict[str, str]
    ) -> None:
        key = self.zkey(flags, words[0])
        if key in self.s["migs"]:
            raise self.exists(name, key)
        if flags["template"] not in self.s["templates"]:
            raise self.not_found(name, flags["template"])
        self._template_image(name, flags["template"], self.project(flags))
        data_disk_users = [i for i in self.s["instances"].values() if not i.get("boot_disk")]
        if any(inst["zone"] == flags["zone"] for inst in data_disk_users):
            raise GcloudError(1, f"ERROR: ({name}) disk already attached to another instance\n")
        self.s["migs"][key] = {"template": flags["template"], "stateful": flags.get("stateful-disk", "")}
        vm = flags["base-instance-name"] + "-abcd"
        self.s["instances"][f"{flags['zone']}/{vm}"] = {
            "zone": flags["zone"],
            "status": "RUNNING",
            "mig": key,
        }

    def cmd_compute_instance_groups_managed_set_instance_template(
        self, name: str, words: list[str], flags: dict[str, str]
    ) -> None:
        key = self.zkey(flags, words[0])
        self.s["migs"][key]["template"] = flags["template"]

    def cmd_compute_instance_groups_managed_update_instances(
        self, name: str, words: list[str], flags: dict[str, str]
    ) -> None:
        self.zkey(flags, words[0])

    def cmd_compute_instance_groups_managed_list_instances(
        self, name: str, words: list[str], flags: dict[str, str]
    ) -> None:
        key = self.zkey(flags, words[0])
        mig = self.s["migs"].get(key)
        if mig is None:
            raise self.not_found(name, key)
        for ikey, inst in sorted(self.s["instances"].items()):
            if inst.get("mig") == key:
                self.emit(f"{ikey.split('/')[1]}\t{inst['status']}\tNONE\t{mig['template']}")

    def cmd_compute_instance_groups_managed_delete(
        self, name: str, words: list[str], flags: dict[str, str]
    ) -> None:
        key = self.zkey(flags, words[0])
        if key not in self.s["migs"]:
            raise self.not_found(name, key)
        del self.s["migs"][key]
        for ikey in [k for k, v in self.s["instances"].items() if v.get("mig") == key]:
            del self.s["instances"][ikey]

    def _require_boot_image(self, name: str, family: str, image_project: str, project: str) -> None:
        """A family of this project (a baked image) must have an image; public families are taken as given."""
        if image_project == project and not self._images_of(family):
            raise self.not_found(name, f"projects/{project}/global/images/family/{family}")

    def _template_image(self, name: str, template: str, project: str) -> None:
        flags = self.s["templates"][template]
        self._require_boot_image(name, flags.get("image-family", ""), flags.get("image-project", ""), project)

    def cmd_compute_instances_describe(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        key = self.zkey(flags, words[0])
        inst = self.s["instances"].get(key)
        if inst is None:
            raise self.not_found(
                name, f"projects/{self.project(flags)}/zones/{key.replace('/', '/instances/')}"
            )
        if inst.get("bake_polls") is not None and inst["status"] == "RUNNING":
            inst["bake_polls"] -= 1
            if inst["bake_polls"] <= 0:
                inst["status"] = "TERMINATED"  # the builder powered itself off: the bake is done
        fmt = flags.get("format", "")
        if fmt == "value(name)":
            self.emit(words[0])
        elif fmt == "value(status,lastStartTimestamp)":
            self.emit(f"{inst['status']}\t2026-01-01T00:00:00Z")
        else:
            self.emit(inst["status"])

    def cmd_compute_instances_create(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        self._need_api("compute.googleapis.com", name)
        key = self.zkey(flags, words[0])
        project = self.project(flags)
        if key in self.s["instances"]:
            raise self.exists(name, key)
        if "source-instance-template" in flags:
            if flags["source-instance-template"] not in self.s["templates"]:
                raise self.not_found(name, flags["source-instance-template"])
            self._template_image(name, flags["source-instance-template"], project)
            self.s["instances"][key] = {"zone": flags["zone"], "status": "RUNNING"}
            return
        # A VM from flags: the image builder.
        for required in ("machine-type", "accelerator", "image-family", "image-project", "service-account"):
            if required not in flags:
                raise GcloudError(3, f"fake gcloud: instance created without --{required}")
        if "restart-on-failure" in flags and flags.get("provisioning-model") == "SPOT":
            raise GcloudError(
                1,
                f"ERROR: ({name}) Scheduling must have preemptible be false when AutomaticRestart is true.\n",
            )
        email = flags["service-account"]
        if email not in self.s["service_accounts"]:
            raise GcloudError(
                1,
                f"ERROR: ({name}) The resource 'projects/{project}/serviceAccounts/{email}' was not found\n",
            )
        self._require_boot_image(name, flags["image-family"], flags["image-project"], project)
        metadata = dict(item.split("=", 1) for item in flags.get("metadata", "").split(",") if item)
        polls = os.environ.get("FAKE_GCLOUD_BAKE_POLLS", "2")
        self.s["instances"][key] = {
            "zone": flags["zone"],
            "status": "RUNNING",
            "boot_disk": words[0],
            "flags": flags,
            "metadata": metadata,
            "bake_polls": (10**9 if polls == "never" else int(polls))
            if metadata.get("triplet-bake") == "true"
            else None,
        }

    def cmd_compute_instances_delete(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        key = self.zkey(flags, words[0])
        if key not in self.s["instances"]:
            raise self.not_found(name, key)
        del self.s["instances"][key]

    def cmd_compute_instances_start(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        self.s["instances"][self.zkey(flags, words[0])]["status"] = "RUNNING"

    # --- images ---------------------------------------------------------------------------------------------
    def _images_of(self, family: str) -> list[str]:
        """The family's images, oldest first."""
        found = [(i["created"], n) for n, i in self.s["images"].items() if i["family"] == family]
        return [n for _, n in sorted(found)]

    def cmd_compute_images_describe_from_family(
        self, name: str, words: list[str], flags: dict[str, str]
    ) -> None:
        project = self.project(flags)
        images = self._images_of(words[0])
        if not images:
            raise self.not_found(name, f"projects/{project}/global/images/family/{words[0]}")
        if flags.get("format") == "value(name)":
            self.emit(images[-1])
        elif flags.get("format") == "value(name,creationTimestamp)":
            self.emit(f"{images[-1]}\t2026-01-01T00:00:00Z")
        else:
            raise GcloudError(3, f"fake gcloud: unsupported format {flags.get('format')}")

    def cmd_compute_images_create(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        self._need_api("compute.googleapis.com", name)
        self.project(flags)
        if words[0] in self.s["images"]:
            raise self.exists(name, words[0])
        disk, zone = flags.get("source-disk", ""), flags.get("source-disk-zone", "")
        users = [i for k, i in self.s["instances"].items() if k == f"{zone}/{disk}" and i.get("boot_disk")]
        if not users:
            raise self.not_found(name, f"projects/x/zones/{zone}/disks/{disk}")
        if users[0]["status"] != "TERMINATED" and "force" not in flags:
            raise GcloudError(
                1,
                f"ERROR: ({name}) The disk resource '{disk}' is already being used by '{disk}' "
                "(stop the instance or use --force)\n",
            )
        self.s["images"][words[0]] = {
            "family": flags.get("family", ""),
            "source_disk": f"{zone}/{disk}",
            "source_metadata": users[0].get("metadata", {}),
            "created": self.s.setdefault("image_seq", 0),
        }
        self.s["image_seq"] += 1

    def cmd_compute_images_list(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        self.project(flags)
        family = flags.get("filter", "").removeprefix("family=")
        self.emit(*self._images_of(family))

    def cmd_compute_images_delete(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        if words[0] not in self.s["images"]:
            raise self.not_found(name, f"projects/x/global/images/{words[0]}")
        del self.s["images"][words[0]]

    def cmd_compute_operations_list(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        vm = flags.get("filter", "").rpartition("/instances/")[2]
        self.emit(*(op["time"] for op in self.s["operations"] if op["instance"].startswith(vm)))

    # --- batch ----------------------------------------------------------------------------------------------
    def cmd_batch_jobs_describe(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        if words[0] not in self.s["jobs"]:
            raise GcloudError(
                1,
                f"ERROR: ({name}) NOT_FOUND: Resource 'projects/x/locations/y/jobs/{words[0]}' "
                "was not found\n",
            )
        self.emit(self.s["jobs"][words[0]]["state"])

    def cmd_batch_jobs_submit(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        if words[0] in self.s["jobs"]:
            raise GcloudError(1, f"ERROR: ({name}) ALREADY_EXISTS: job {words[0]} already exists\n")
        config = json.loads(Path(flags["config"]).read_text())
        self.s["jobs"][words[0]] = {"state": "QUEUED", "config": config}

    def cmd_batch_jobs_delete(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        if words[0] not in self.s["jobs"]:
            raise GcloudError(1, f"ERROR: ({name}) NOT_FOUND: job {words[0]}\n")
        del self.s["jobs"][words[0]]

    def cmd_batch_tasks_list(self, name: str, words: list[str], flags: dict[str, str]) -> None:
        job = self.s["jobs"].get(flags.get("job", ""))
        if job is None:
            raise GcloudError(1, f"ERROR: ({name}) NOT_FOUND: job\n")
        count = int(job["config"]["taskGroups"][0]["taskCount"])
        self.emit(*(f"{i}\t{job['state']}" for i in range(count)))


def main(argv: list[str]) -> int:
    state_path = Path(os.environ["FAKE_GCLOUD_STATE"])
    log_path = os.environ.get("FAKE_GCLOUD_LOG")
    if log_path:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(argv) + "\n")
    state = json.loads(state_path.read_text()) if state_path.exists() else _empty_state()
    fake = Fake(state)
    code = 0
    try:
        fake.run(argv)
    except GcloudError as exc:
        sys.stderr.write(exc.message)
        code = exc.code
        fake.out = []
        if "failures" not in state:
            return code
    tmp = state_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    tmp.replace(state_path)
    if code:
        return code
    if fake.out:
        sys.stdout.write("\n".join(fake.out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
