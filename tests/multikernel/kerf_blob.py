#!/usr/bin/env python3
"""Reference blobs from kerf itself (PyPI kerf-multikernel 0.4.0), for byte comparison.

Run with the kerf venv's interpreter:

    /opt/kerf-venv/bin/python tests/multikernel/kerf_blob.py -o OUT.dtb '<request json>'
    /opt/kerf-venv/bin/python tests/multikernel/kerf_blob.py -o OUT.dtb @request.json
    /opt/kerf-venv/bin/python tests/multikernel/kerf_blob.py --batch requests.json

A single request writes kerf's blob to OUT and exits 0; when kerf refuses the request
nothing is written, kerf's own error text goes to stderr and the exit status is 3
(1 = bad harness usage or an unexpected crash). With --batch the file holds a JSON list
of requests, each with its own "out"; one JSON line per request goes to stdout:
{"out": ..., "ok": true, "size": N} or {"out": ..., "ok": false, "error": "..."}.
kerf's own chatter (notes such as "Memory: 2048 MB on node 0 (...)") goes to stderr.

How the bytes are made
----------------------
Every request runs kerf's real click command (kerf.cli.main: `init`, `create`, `update`,
`delete`) in-process, so kerf's own parsing (parse_cpu_spec, parse_memory_spec,
parse_memory_request, parse_device_list ...), validation (MultikernelValidator,
validate_cpu_allocation, id range 1-511 ...) and encoders run unchanged. Only the
points where kerf touches the kernel or the host are replaced:

  blob encoders (untouched, the bytes come from here, via pylibfdt FdtSw + Fdt.pack):
    baseline : kerf.dtc.extractor.InstanceExtractor.generate_global_dtb
               (called by kerf.baseline.BaselineManager.write_baseline, which writes
               the file: we give it OUT as its baseline_path)
    create   : kerf.dtc.overlay.OverlayGenerator.generate_overlay -> _create_overlay_dtb
               (called by kerf.runtime.DeviceTreeManager.apply_overlay)
    update   : kerf.dtc.overlay.OverlayGenerator.generate_update_overlay
               (called by kerf.update.main.update)
    delete   : kerf.dtc.overlay.OverlayGenerator.generate_removal_overlay
               (called by DeviceTreeManager.apply_removal_overlay)

  replaced host/kernel access (monkeypatched):
    DeviceTreeManager.apply_dtbo       -> captures the DTBO bytes instead of writing
                                          /sys/fs/multikernel/overlays/new
    DeviceTreeManager.read_baseline    -> returns the "pool" of the request as a model
    DeviceTreeManager.has_instance     -> True for update/delete, False for create
    DeviceTreeManager.read_instance_dtb-> an instance DTB built here (model, id,
                                          resources{cpus,memory-base,memory-bytes},
                                          PCI host-bridge tree) from "instance"
    DeviceTreeManager.lock             -> no-op (kerf uses /var/run/kerf.lock)
    init: mount_multikernel_fs (no-op), read_current_pool (None: no pool yet),
          get_valid_apic_ids_from_system ("system_apic_ids"), cpu_numa_nodes
          ("cpu_nodes"), detect_device_from_system ("devices" table), BaselineManager
          (path = OUT), get_busy_chunks_from_iomem (empty)
    update: get_instance_id_from_name ("id"), get_instance_regions_from_iomem,
          find_free_range_from_iomem and get_memory_granule are kerf's own functions
          bound to a fake /proc/iomem and block_size_bytes written to a temp dir
    delete: get_instance_id_from_name, get_instance_name_from_id, get_instance_status,
          kerf.metadata.delete_instance_metadata (no-op)

Requests (JSON objects; sizes/cpus are kerf CLI strings, passed through verbatim)
--------------------------------------------------------------------------------
baseline  {"kind": "baseline", "cpus": "1-3", "memory": "2GB",
           "devices": [{"host": "enp9s0", "pci_id": "0000:09:00.0",
                        "compatible": "pci-network", "vendor_id": 32902,
                        "device_id": 5427, "alias": "eth0"}],        # optional
           "system_apic_ids": "0-3",   # optional: APIC ids /proc/cpuinfo lists;
                                       #   default 0..max(cpus) (+ the cpus)
           "cpu_nodes": {"1": 0}}      # optional: APIC id -> NUMA node (sysfs);
                                       #   default none known -> node 0
          -> kerf init --cpus CPUS --memory MEMORY [--devices host[=alias],...]
          A devices entry may also be a plain string: a PCI address (host = address).
create    {"kind": "create", "name": "web", "id": 1, "cpus": "2-3", "memory": "512MB",
           "devices": ["0000:09:00.0"],            # optional, refs as for --devices
           "cpu_count": 2, "cpu_affinity": "compact", "numa_nodes": "0",
           "memory_policy": "local", "enable_host_kcore": false, "uring": false,
           "uring_sq_entries": 256, ...             # all optional kerf options
           "pool": {"cpus": "0-7", "memory": "4GB",
                    "devices": ["0000:09:00.0" | {"pci_id":..., "alias":...}],
                    "free_cpus": "2-7"}}           # optional; default = what is asked
          -> kerf create NAME [--id ID] --cpus CPUS --memory MEMORY [--devices ...]
update    {"kind": "update", "name": "web", "id": 1,
           "instance": {"cpus": "2-3", "memory": "512MB", "devices": ["0000:09:00.0"],
                        "regions": [[base, size], ...]},    # oldest first
           "cpus": "2-5", "memory": "1GB", "devices": "0000:0a:00.0" | "none",
           "pool": {"cpus": "0-7", "chunks": [[base, size], ...], "granule": 134217728,
                    "others": [[base, size, "name"], ...], "devices": [...]}}
          -> kerf update NAME [--cpus] [--memory] [--devices]
          Defaults: one pool chunk of 4 GiB at 0x100000000, the instance's memory as one
          region at the chunk base, granule from block_size_bytes = 128 MiB (kerf's
          fallback), pool cpus = instance cpus + requested cpus.
delete    {"kind": "delete", "name": "web", "id": 1, "status": "ready", "by_id": false}
          -> kerf delete NAME   (or kerf delete --id ID with "by_id": true)
"""

import argparse
import contextlib
import functools
import io
import json
import os
import struct
import sys
import tempfile
import traceback

import libfdt

import kerf.cli
import kerf.delete.main as kdelete
import kerf.init.main as kinit
import kerf.metadata as kmetadata
import kerf.runtime as kruntime
import kerf.update.main as kupdate
from kerf import resources as kresources
from kerf.baseline import BaselineManager
from kerf.create.main import parse_cpu_spec, parse_memory_spec
from kerf.devices import normalize_pci_id, pci_node_name
from kerf.dtc.cells import pack_cpu_ids
from kerf.models import (
    CPUAllocation,
    DeviceInfo,
    GlobalDeviceTree,
    HardwareInventory,
    MemoryAllocation,
    PoolMemoryRegion,
)

DEFAULT_CHUNK_BASE = 0x1_0000_0000
DEFAULT_CHUNK_SIZE = 4 << 30


class KerfRefused(Exception):
    """kerf exited non-zero: the request is one kerf does not turn into a blob."""


class HarnessError(Exception):
    """The request itself is malformed for this harness."""


def _cpus(spec):
    """Harness-side cpu list (for pool/instance state only; never for the request)."""
    if spec is None:
        return []
    if isinstance(spec, list):
        return sorted(set(int(c) for c in spec))
    return parse_cpu_spec(str(spec))


def _size(spec):
    if isinstance(spec, int):
        return spec
    return parse_memory_spec(str(spec))


def _pool_device(entry):
    if isinstance(entry, str):
        entry = {"pci_id": entry}
    pci = normalize_pci_id(entry["pci_id"])
    if pci is None:
        raise HarnessError(f"pool device {entry!r}: pci_id is not DDDD:BB:SS.F")
    name = pci_node_name(pci)
    return name, DeviceInfo(
        name=name,
        compatible=entry.get("compatible", "pci-device"),
        device_type="pci",
        pci_id=pci,
        alias=entry.get("alias"),
        vendor_id=entry.get("vendor_id"),
        device_id=entry.get("device_id"),
    )


def _pool_tree(cpus, memory, devices, free_cpus=None, chunks=None):
    """The root read-back model kerf would parse from /sys/fs/multikernel/device_tree."""
    cpus = sorted(set(cpus))
    regions = [PoolMemoryRegion(base=b, size=s, node=0) for b, s in (chunks or [])]
    memory_alloc = MemoryAllocation(
        total_bytes=sum(s for _, s in chunks) if chunks else memory,
        host_reserved_bytes=0,
        regions=regions,
        requested={} if chunks else {0: memory},
    )
    return GlobalDeviceTree(
        hardware=HardwareInventory(
            cpus=CPUAllocation(
                total=(max(cpus) + 1) if cpus else 0,
                host_reserved=[],
                available=cpus,
                available_free=sorted(set(free_cpus)) if free_cpus is not None else None,
            ),
            memory=memory_alloc,
            devices=dict(_pool_device(d) for d in devices),
        ),
        instances={},
        device_references={},
    )


def _instance_dtb(name, instance_id, cpus, memory_base, memory_bytes, devices):
    """An instance device tree as the kernel serves it (what kerf dump writes)."""
    sw = libfdt.FdtSw()
    sw.finish_reservemap()
    sw.begin_node("")
    sw.property_string("model", name)
    sw.property_u32("id", instance_id)
    sw.begin_node("resources")
    sw.property("cpus", pack_cpu_ids(cpus))
    sw.property_u64("memory-base", memory_base)
    sw.property_u64("memory-bytes", memory_bytes)
    sw.end_node()
    by_domain = {}
    for entry in devices:
        pci = normalize_pci_id(entry if isinstance(entry, str) else entry["pci_id"])
        if pci is None:
            raise HarnessError(f"instance device {entry!r} is not DDDD:BB:SS.F")
        dom, bus, rest = pci.split(":")
        slot, fn = rest.split(".")
        by_domain.setdefault(int(dom, 16), []).append((int(bus, 16), int(slot, 16), int(fn, 16)))
    for dom, devs in sorted(by_domain.items()):
        sw.begin_node(f"pci@{dom:x}")
        sw.property_string("compatible", "multikernel,pci-host-bridge")
        sw.property_u32("linux,pci-domain", dom)
        for bus, slot, fn in sorted(devs):
            sw.begin_node(f"dev@{bus:x},{slot:x},{fn:x}")
            sw.property("reg", struct.pack(">5I", bus << 16 | slot << 11 | fn << 8, 0, 0, 0, 0))
            sw.property_u32("vendor-id", 0x8086)
            sw.property_u32("device-id", 0x1234)
            sw.end_node()
        sw.end_node()
    sw.end_node()
    fdt = sw.as_fdt()
    fdt.pack()
    return bytes(fdt.as_bytearray())


class _Patches:
    """Set attributes for the duration of one request, then put them back."""

    def __init__(self):
        self._saved = []

    def set(self, obj, attr, value):
        self._saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    def restore(self):
        for obj, attr, value in reversed(self._saved):
            setattr(obj, attr, value)
        self._saved.clear()


@contextlib.contextmanager
def _no_lock(self):  # pylint: disable=unused-argument
    yield


def _run_cli(args):
    """Run `kerf ARGS`; returns kerf's combined output, raises KerfRefused on failure."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            kerf.cli.main.main(args=args, prog_name="kerf", standalone_mode=False)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except kerf.cli.click.exceptions.ClickException as e:
            e.show()
            code = e.exit_code
        except kerf.cli.click.exceptions.Abort:
            code = 1
    chatter = out.getvalue() + err.getvalue()
    if code:
        raise KerfRefused(err.getvalue().strip() or out.getvalue().strip() or f"exit {code}")
    return chatter


def _flag(args, name, value):
    if value is None or value is False:
        return
    if value is True:
        args.append(name)
    else:
        args += [name, str(value)]


def build(req, tmp):
    """Produce kerf's blob for one request; returns bytes."""
    kind = req.get("kind")
    p = _Patches()
    captured = []

    def fake_apply_dtbo(self, dtbo):  # pylint: disable=unused-argument
        captured.append(bytes(dtbo))
        return "0"

    p.set(kruntime.DeviceTreeManager, "apply_dtbo", fake_apply_dtbo)
    p.set(kruntime.DeviceTreeManager, "lock", _no_lock)
    try:
        if kind == "baseline":
            return _baseline(req, tmp, p)
        if kind == "create":
            blob = _create(req, p, captured)
        elif kind == "update":
            blob = _update(req, tmp, p, captured)
        elif kind == "delete":
            blob = _delete(req, p, captured)
        else:
            raise HarnessError(f"unknown kind {kind!r} (baseline, create, update, delete)")
        return blob
    finally:
        p.restore()


def _one(captured):
    if len(captured) != 1:
        raise HarnessError(f"kerf produced {len(captured)} overlays, expected 1")
    return captured[0]


def _baseline(req, tmp, p):
    out_path = os.path.join(tmp, "device_tree")
    if os.path.exists(out_path):
        os.unlink(out_path)

    class OutBaseline(BaselineManager):
        def __init__(self, baseline_path=None):
            super().__init__(out_path)

    cpus_spec = req.get("cpus")
    system = req.get("system_apic_ids")
    if system is not None:
        valid = set(_cpus(system))
    else:
        try:
            pool = set(_cpus(cpus_spec)) if cpus_spec and cpus_spec.strip().lower() != "none" else set()
        except ValueError:
            pool = set()
        valid = set(range(0, max(pool) + 1)) | pool if pool else {0}
    cpu_nodes = {int(k): int(v) for k, v in (req.get("cpu_nodes") or {}).items()}

    table = {}
    dev_args = []
    devices = req.get("devices")
    if isinstance(devices, str):
        dev_args = [devices]
        devices = []
    for entry in devices or []:
        if isinstance(entry, str):
            entry = {"pci_id": entry}
        host = entry.get("host") or entry["pci_id"]
        table[host] = entry
        dev_args.append(host + (f"={entry['alias']}" if entry.get("alias") else ""))

    def detect(host):
        entry = table.get(host)
        if entry is None:
            return None
        return DeviceInfo(
            name=host,
            compatible=entry.get("compatible", "pci-device"),
            device_type="pci",
            pci_id=entry["pci_id"],
            vendor_id=entry.get("vendor_id"),
            device_id=entry.get("device_id"),
        )

    p.set(kinit, "mount_multikernel_fs", lambda verbose=False: None)
    p.set(kinit, "read_current_pool", lambda mgr: None)
    p.set(kinit, "get_valid_apic_ids_from_system", lambda: set(valid))
    p.set(kinit, "cpu_numa_nodes", lambda *a, **k: dict(cpu_nodes))
    p.set(kinit, "detect_device_from_system", detect)
    p.set(kinit, "get_busy_chunks_from_iomem", lambda *a, **k: set())
    p.set(kinit, "BaselineManager", OutBaseline)

    args = ["init"]
    _flag(args, "--cpus", cpus_spec)
    _flag(args, "--memory", req.get("memory"))
    if dev_args:
        args += ["--devices", ",".join(dev_args)]
    chatter = _run_cli(args)
    sys.stderr.write(chatter)
    if not os.path.exists(out_path):
        raise KerfRefused(chatter.strip() or "kerf wrote no baseline")
    with open(out_path, "rb") as f:
        return f.read()


def _create(req, p, captured):
    name = req.get("name")
    pool = req.get("pool") or {}
    try:
        want_cpus = _cpus(req.get("cpus")) if req.get("cpus") else []
    except ValueError:
        want_cpus = []
    pool_cpus = _cpus(pool["cpus"]) if "cpus" in pool else (want_cpus or list(range(0, 64)))
    if "memory" in pool:
        pool_mem = _size(pool["memory"])
    else:
        try:
            pool_mem = max(_size(req["memory"]), 4096)
        except (KeyError, ValueError):
            pool_mem = 1 << 40
    pool_devs = pool.get("devices")
    if pool_devs is None:
        pool_devs = [d for d in (req.get("devices") or []) if normalize_pci_id(d)]
    tree = _pool_tree(pool_cpus, pool_mem, pool_devs,
                      free_cpus=_cpus(pool["free_cpus"]) if "free_cpus" in pool else None)

    p.set(kruntime.DeviceTreeManager, "read_baseline", lambda self: __import__("copy").deepcopy(tree))
    p.set(kruntime.DeviceTreeManager, "has_instance", lambda self, n: False)

    args = ["create"]
    if name is not None:
        args.append(str(name))
    _flag(args, "--id", req.get("id"))
    _flag(args, "--cpus", req.get("cpus"))
    _flag(args, "--cpu-count", req.get("cpu_count"))
    _flag(args, "--cpu-affinity", req.get("cpu_affinity"))
    _flag(args, "--numa-nodes", req.get("numa_nodes"))
    _flag(args, "--memory-policy", req.get("memory_policy"))
    _flag(args, "--memory", req.get("memory"))
    devices = req.get("devices")
    if devices is not None:
        args += ["--devices", devices if isinstance(devices, str) else ",".join(devices)]
    _flag(args, "--enable-host-kcore", req.get("enable_host_kcore"))
    _flag(args, "--uring", req.get("uring"))
    _flag(args, "--uring-sq-entries", req.get("uring_sq_entries"))
    _flag(args, "--uring-cq-entries", req.get("uring_cq_entries"))
    _flag(args, "--uring-shim-pages", req.get("uring_shim_pages"))
    sys.stderr.write(_run_cli(args))
    return _one(captured)


def _update(req, tmp, p, captured):
    name = req["name"]
    instance_id = int(req.get("id", 1))
    inst = req.get("instance") or {}
    inst_cpus = _cpus(inst.get("cpus", "0"))
    inst_mem = _size(inst.get("memory", "512MB"))
    inst_devs = inst.get("devices") or []
    pool = req.get("pool") or {}
    chunks = [tuple(int(x) for x in c) for c in pool.get("chunks") or
              [(DEFAULT_CHUNK_BASE, DEFAULT_CHUNK_SIZE)]]
    regions = [tuple(int(x) for x in r) for r in inst.get("regions") or
               [(chunks[0][0], inst_mem)]]
    others = pool.get("others") or []
    try:
        new_cpus = _cpus(req["cpus"]) if req.get("cpus") else []
    except ValueError:
        new_cpus = []
    pool_cpus = _cpus(pool["cpus"]) if "cpus" in pool else sorted(set(inst_cpus) | set(new_cpus))
    pool_devs = pool.get("devices")
    if pool_devs is None:
        requested = req.get("devices")
        if isinstance(requested, str):
            requested = [d.strip() for d in requested.split(",")]
        pool_devs = [d for d in (requested or []) if normalize_pci_id(d) and
                     normalize_pci_id(d) not in {normalize_pci_id(x) for x in inst_devs}]
    tree = _pool_tree(pool_cpus, sum(s for _, s in chunks), pool_devs, chunks=chunks,
                      free_cpus=_cpus(pool["free_cpus"]) if "free_cpus" in pool else None)

    # /proc/iomem as the kernel lays it out: pool chunks, instance regions nested in them.
    iomem = os.path.join(tmp, "iomem")
    lines = []
    for base, size in chunks:
        lines.append(f"{base:08x}-{base + size - 1:08x} : Multikernel Memory Pool")
        for n, (rb, rs) in enumerate(regions):
            if base <= rb and rb + rs <= base + size:
                lines.append(f"  {rb:08x}-{rb + rs - 1:08x} : mk-instance-{instance_id}-{name}-region-{n}")
        for ob, osz, oname in others:
            if base <= ob and ob + osz <= base + size:
                lines.append(f"  {ob:08x}-{ob + osz - 1:08x} : {oname}")
    with open(iomem, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    tree_path = os.path.join(tmp, "no-device-tree")
    block_path = os.path.join(tmp, "block_size_bytes")
    if os.path.exists(block_path):
        os.unlink(block_path)
    if pool.get("granule") is not None:
        with open(block_path, "w", encoding="utf-8") as f:
            f.write(f"{int(pool['granule']):x}\n")

    dtb = _instance_dtb(name, instance_id, inst_cpus, regions[0][0] if regions else 0,
                        inst_mem, inst_devs)

    p.set(kruntime.DeviceTreeManager, "read_baseline", lambda self: __import__("copy").deepcopy(tree))
    p.set(kruntime.DeviceTreeManager, "has_instance", lambda self, n: n == name)
    p.set(kruntime.DeviceTreeManager, "read_instance_dtb", lambda self, n: dtb)
    p.set(kupdate, "get_instance_id_from_name", lambda n: instance_id if n == name else None)
    p.set(kupdate, "get_instance_regions_from_iomem",
          functools.partial(kresources.get_instance_regions_from_iomem, iomem_path=iomem))
    p.set(kupdate, "find_free_range_from_iomem",
          functools.partial(kresources.find_free_range_from_iomem, iomem_path=iomem))
    p.set(kupdate, "get_memory_granule",
          functools.partial(kresources.get_memory_granule, tree_path=tree_path,
                            block_size_path=block_path))

    args = ["update", name]
    _flag(args, "--cpus", req.get("cpus"))
    _flag(args, "--memory", req.get("memory"))
    devices = req.get("devices")
    if devices is not None:
        args += ["--devices", devices if isinstance(devices, str) else ",".join(devices)]
    sys.stderr.write(_run_cli(args))
    return _one(captured)


def _delete(req, p, captured):
    name = req["name"]
    instance_id = int(req.get("id", 1))
    status = req.get("status", "ready")
    p.set(kruntime.DeviceTreeManager, "has_instance", lambda self, n: n == name)
    p.set(kdelete, "get_instance_id_from_name", lambda n: instance_id if n == name else None)
    p.set(kdelete, "get_instance_name_from_id", lambda i: name if i == instance_id else None)
    p.set(kdelete, "get_instance_status", lambda n: status)
    p.set(kmetadata, "delete_instance_metadata", lambda n: None)
    args = ["delete"] + (["--id", str(instance_id)] if req.get("by_id") else [name])
    sys.stderr.write(_run_cli(args))
    return _one(captured)


def _load(arg):
    if arg == "-":
        return json.load(sys.stdin)
    if arg.startswith("@"):
        with open(arg[1:], encoding="utf-8") as f:
            return json.load(f)
    return json.loads(arg)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("request", nargs="?", help="JSON request, @FILE, or - for stdin")
    ap.add_argument("-o", "--out", help="where to write the blob")
    ap.add_argument("--batch", help="JSON file: list of requests, each with an \"out\"")
    ns = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="kerf-blob-") as tmp:
        if ns.batch:
            with open(ns.batch, encoding="utf-8") as f:
                reqs = json.load(f)
            failures = 0
            for req in reqs:
                out = req.get("out")
                try:
                    blob = build(req, tmp)
                    with open(out, "wb") as f:
                        f.write(blob)
                    print(json.dumps({"out": out, "ok": True, "size": len(blob)}), flush=True)
                except KerfRefused as e:
                    print(json.dumps({"out": out, "ok": False, "error": str(e)}), flush=True)
                except Exception as e:  # pylint: disable=broad-except
                    failures += 1
                    print(json.dumps({"out": out, "ok": False, "harness_error": repr(e)}),
                          flush=True)
            return 1 if failures else 0

        if not ns.request or not ns.out:
            ap.error("need a request and -o OUT (or --batch FILE)")
        req = _load(ns.request)
        try:
            blob = build(req, tmp)
        except KerfRefused as e:
            sys.stderr.write(f"kerf refused: {e}\n")
            return 3
        except HarnessError as e:
            sys.stderr.write(f"bad request: {e}\n")
            return 1
        except Exception:  # pylint: disable=broad-except
            traceback.print_exc()
            return 1
        with open(ns.out, "wb") as f:
            f.write(blob)
        return 0


if __name__ == "__main__":
    sys.exit(main())
