#!/usr/bin/env python3
"""Build a single-layer OCI image tarball from a list of local files, with the standard library only.

The tarball is an OCI image layout (oci-layout, index.json, blobs/sha256/...) whose index entry
carries the full reference both as `io.containerd.image.name` and as
`org.opencontainers.image.ref.name`, plus a docker-style manifest.json with RepoTags for
`docker load`. Checked with containerd 1.6.20's `ctr -n k8s.io images import FILE` (no flags):
- either annotation holding a full reference names the image exactly so;
- a bare tag in `org.opencontainers.image.ref.name` (the OCI spec's usual form, e.g. "e2e") is
  imported as "import-<date>:e2e" unless `--base-name localhost/kdp-busybox` is given;
- when index.json exists, manifest.json is ignored: without annotations the image has no name;
- `--index-name NAME` only adds a second image, for the index itself.
Output is reproducible: entries are sorted and timestamps fixed.

Usage:
  oci_image.py --name localhost/kdp-busybox:e2e --out busybox.tar \\
      --file /bin/busybox=/bin/busybox --link /bin/sh=busybox --dir /tmp \\
      --entrypoint /bin/sh

  --file SRC=DEST[:MODE]   copy the host file SRC to DEST in the image (MODE in octal)
  --link DEST=TARGET       symlink DEST -> TARGET
  --dir DEST[:MODE]        an empty directory
  --entrypoint / --cmd     repeatable: one argument each; --env KEY=VALUE repeatable
  --label KEY=VALUE        repeatable: the image config's labels; --user USER[:GROUP]
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile

EPOCH = 0  # mtime of every entry
CREATED = "1970-01-01T00:00:00Z"


def parse_mode(spec, default):
    """Split "PATH[:MODE]" into (path, mode)."""
    path, sep, mode = spec.rpartition(":")
    if sep and mode and all(c in "01234567" for c in mode):
        return path, int(mode, 8)
    return spec, default


def clean(dest):
    dest = os.path.normpath("/" + dest.strip())
    if dest == "/":
        raise SystemExit("oci_image.py: '/' cannot be an entry")
    return dest.lstrip("/")


def tarinfo(name, kind, mode):
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.mtime = EPOCH
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    return ti


def build_layer(files, links, dirs):
    """Return the uncompressed layer tar bytes."""
    entries = {}  # name -> (TarInfo, data or None)

    def add_parents(name):
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in entries:
                entries[d] = (tarinfo(d, tarfile.DIRTYPE, 0o755), None)

    for spec in dirs:
        dest, mode = parse_mode(spec, 0o755)
        name = clean(dest)
        add_parents(name)
        entries[name] = (tarinfo(name, tarfile.DIRTYPE, mode), None)

    for spec in files:
        src, sep, rest = spec.partition("=")
        if not sep:
            raise SystemExit(f"oci_image.py: --file wants SRC=DEST, got {spec!r}")
        with open(src, "rb") as f:
            data = f.read()
        dest, mode = parse_mode(rest, os.stat(src).st_mode & 0o7777)
        name = clean(dest)
        add_parents(name)
        ti = tarinfo(name, tarfile.REGTYPE, mode)
        ti.size = len(data)
        entries[name] = (ti, data)

    for spec in links:
        dest, sep, target = spec.partition("=")
        if not sep or not target:
            raise SystemExit(f"oci_image.py: --link wants DEST=TARGET, got {spec!r}")
        name = clean(dest)
        add_parents(name)
        ti = tarinfo(name, tarfile.SYMTYPE, 0o777)
        ti.linkname = target
        entries[name] = (ti, None)

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(entries):
            ti, data = entries[name]
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def descriptor(media_type, data, **extra):
    d = {"mediaType": media_type, "digest": sha256(data), "size": len(data)}
    d.update(extra)
    return d


def dumps(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def build_image(args):
    layer_tar = build_layer(args.file, args.link, args.dir)
    layer_gz = gzip.compress(layer_tar, compresslevel=6, mtime=EPOCH)

    config = {
        "architecture": args.arch,
        "os": "linux",
        "created": CREATED,
        "config": {
            "Env": args.env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [sha256(layer_tar)]},
        "history": [{"created": CREATED, "created_by": "oci_image.py"}],
    }
    if args.entrypoint:
        config["config"]["Entrypoint"] = args.entrypoint
    if args.cmd:
        config["config"]["Cmd"] = args.cmd
    if args.user:
        config["config"]["User"] = args.user
    if args.label:
        labels = {}
        for spec in args.label:
            key, sep, value = spec.partition("=")
            if not sep or not key:
                raise SystemExit(f"oci_image.py: --label wants KEY=VALUE, got {spec!r}")
            labels[key] = value
        config["config"]["Labels"] = labels
    config_json = dumps(config)

    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", config_json),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar+gzip", layer_gz)],
    }
    manifest_json = dumps(manifest)

    tag = args.name.rsplit("/", 1)[-1].partition(":")[2] or "latest"
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            descriptor(
                "application/vnd.oci.image.manifest.v1+json",
                manifest_json,
                platform={"architecture": args.arch, "os": "linux"},
                annotations={
                    # containerd's own: the image's full name
                    "io.containerd.image.name": args.name,
                    # the OCI spec's; containerd also takes a full reference here as the name
                    "org.opencontainers.image.ref.name": args.name,
                },
            )
        ],
    }
    blobs = {
        sha256(layer_gz): layer_gz,
        sha256(config_json): config_json,
        sha256(manifest_json): manifest_json,
    }
    # docker-style manifest.json, for `docker load` and older importers
    docker_manifest = [
        {
            "Config": "blobs/sha256/" + sha256(config_json)[7:],
            "RepoTags": [args.name if ":" in args.name.rsplit("/", 1)[-1] else f"{args.name}:{tag}"],
            "Layers": ["blobs/sha256/" + sha256(layer_gz)[7:]],
        }
    ]

    members = [
        ("oci-layout", dumps({"imageLayoutVersion": "1.0.0"})),
        ("index.json", dumps(index)),
        ("manifest.json", dumps(docker_manifest)),
    ]
    members += [("blobs/sha256/" + d[7:], b) for d, b in sorted(blobs.items())]

    out_tmp = args.out + ".tmp"
    with tarfile.open(out_tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("blobs", "blobs/sha256"):
            tar.addfile(tarinfo(d, tarfile.DIRTYPE, 0o755))
        for name, data in members:
            ti = tarinfo(name, tarfile.REGTYPE, 0o644)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    os.replace(out_tmp, args.out)
    return sha256(manifest_json)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="image reference, e.g. localhost/kdp-busybox:e2e")
    p.add_argument("--out", required=True, help="output tarball")
    p.add_argument("--file", action="append", default=[], metavar="SRC=DEST[:MODE]")
    p.add_argument("--link", action="append", default=[], metavar="DEST=TARGET")
    p.add_argument("--dir", action="append", default=[], metavar="DEST[:MODE]")
    p.add_argument("--entrypoint", action="append", default=[], metavar="ARG")
    p.add_argument("--cmd", action="append", default=[], metavar="ARG")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--user", default="", metavar="USER[:GROUP]")
    p.add_argument("--arch", default="amd64")
    args = p.parse_args(argv)
    if not (args.file or args.link or args.dir):
        p.error("nothing to put in the image")
    digest = build_image(args)
    print(f"{args.out}: {args.name} {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
