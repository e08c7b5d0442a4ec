"""``hvvmm img``: create, inspect, check, convert, compare and commit disk images (raw and VHD),
so that no other tool is needed. The commands and their options follow ``qemu-img``'s.

Every error is one line on stderr; the exit status says what kind (see ``hvvmm img --help``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from .block import (FORMATS, SECTOR_SIZE, BlockError, ImageFormatError, open_file, open_image,
                    probe_format)
from .block import vhd
from .cli import UsageError, _Parser, _size, parse_size

STATUS_OK = 0
STATUS_DIFFERENT = 1   # compare: the images differ; check: leaks or a stale copy, no errors
STATUS_USAGE = 2
STATUS_IO_ERROR = 3    # a missing or locked file, a failed read or write
STATUS_BAD_IMAGE = 4

EXIT_STATUS_HELP = """\
exit status:
  0    done (compare: identical; check: no problem found, or all repaired)
  1    compare: the images differ; check: leaked space or a stale footer copy, no errors
  2    bad command line
  3    I/O error: a missing, unreadable or locked file
  4    a bad image (one line says what is wrong); nothing was written to it

sizes: 512K, 64M, 10G, 2T; a plain number is MiB.
"""

CHUNK_SECTORS = vhd.DEFAULT_BLOCK_SIZE // SECTOR_SIZE


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hvvmm img", description="Create, inspect, check, convert, compare and "
                     "commit disk images (raw and VHD).", epilog=EXIT_STATUS_HELP,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    create = commands.add_parser(
        "create", help="create an image",
        description="Create an image. VHD sizes are rounded up to the disk geometry (as "
                    "qemu-img does) unless -o force_size=on; a differencing image (-b) has its "
                    "parent's size.")
    create.add_argument("-f", dest="format", choices=("raw", "vhd"), default=None,
                        help="image format (default raw; vhd with -b)")
    create.add_argument("-o", dest="options", metavar="OPTIONS", default="",
                        help="VHD: subformat=fixed|dynamic, block_size=SIZE (default 2M), "
                             "force_size=on|off")
    create.add_argument("-b", dest="parent", metavar="PARENT",
                        help="create a differencing VHD over this VHD")
    create.add_argument("file", metavar="FILE")
    create.add_argument("size", metavar="SIZE", type=_size, nargs="?")

    info = commands.add_parser("info", help="describe an image")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("-f", dest="format", choices=sorted(FORMATS), help="image format")
    info.add_argument("file", metavar="FILE")

    check = commands.add_parser(
        "check", help="check an image's metadata",
        description="Check a VHD image: checksums, the BAT (inside the file, no overlaps), "
                    "bitmaps inside the file, the parent link.")
    check.add_argument("-r", dest="repair", action="store_true",
                       help="repair what is safe to repair: leaked space, a stale footer copy")
    check.add_argument("-f", dest="format", choices=sorted(FORMATS), help="image format")
    check.add_argument("file", metavar="FILE")

    convert = commands.add_parser("convert", help="copy an image into another format")
    convert.add_argument("-f", dest="format", choices=sorted(FORMATS),
                         help="source format (default: probed)")
    convert.add_argument("-O", dest="output_format", choices=("raw", "vhd"), required=True,
                         help="output format")
    convert.add_argument("-o", dest="options", metavar="OPTIONS", default="",
                         help="as for create")
    convert.add_argument("source", metavar="SRC")
    convert.add_argument("target", metavar="DST")

    compare = commands.add_parser(
        "compare", help="compare the contents of two images",
        description="Compare what two images' disks hold (any formats). A larger image must "
                    "hold only zeros past the smaller one's end.")
    compare.add_argument("-f", dest="format_a", choices=sorted(FORMATS), help="format of A")
    compare.add_argument("-F", dest="format_b", choices=sorted(FORMATS), help="format of B")
    compare.add_argument("a", metavar="A")
    compare.add_argument("b", metavar="B")

    commit = commands.add_parser(
        "commit", help="merge a differencing VHD into its parent",
        description="Write what a differencing VHD holds into its parent. The child stays as "
                    "it is and still reads the same.")
    commit.add_argument("file", metavar="CHILD")
    return parser


def _options(text: str) -> dict[str, str]:
    known = {"subformat", "block_size", "force_size"}
    options = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise UsageError(f"hvvmm img: unknown option {item!r} (known: "
                             f"{', '.join(sorted(known))})")
        options[key] = value
    if options.get("subformat", "dynamic") not in ("fixed", "dynamic"):
        raise UsageError(f"hvvmm img: subformat must be fixed or dynamic, not "
                         f"{options['subformat']!r}")
    if options.get("force_size", "off") not in ("on", "off"):
        raise UsageError("hvvmm img: force_size must be on or off")
    return options


def _create(path: str, format: str, size: int | None, options: dict[str, str],
            parent: str | None = None) -> int:
    """Create an image; returns its size."""
    if format == "raw":
        if parent is not None or options:
            raise UsageError("hvvmm img: -b and -o are for VHD images")
        size = -(-size // SECTOR_SIZE) * SECTOR_SIZE
        fd = open_file(path, writable=True, create=True)   # locked: never truncate one in use
        try:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        return size
    block_size = vhd.DEFAULT_BLOCK_SIZE
    if "block_size" in options:
        try:
            block_size = parse_size(options["block_size"])
        except ValueError as exc:
            raise UsageError(f"hvvmm img: block_size: {exc}") from None
    try:
        return vhd.create_vhd(path, size or 0, options.get("subformat", "dynamic"), block_size,
                              parent, force_size=options.get("force_size") == "on")
    except ImageFormatError:
        raise
    except ValueError as exc:
        raise UsageError(f"hvvmm img: {exc}") from None


def cmd_create(args) -> int:
    format = args.format or ("vhd" if args.parent else "raw")
    if args.parent and format != "vhd":
        raise UsageError("hvvmm img: -b (a parent) needs -f vhd")
    if args.size is None and not args.parent:
        raise UsageError("hvvmm img create: the size is missing")
    options = _options(args.options)
    size = _create(args.file, format, args.size, options, args.parent)
    extra = f" subformat={'differencing' if args.parent else options.get('subformat', 'dynamic')}" \
        if format == "vhd" else ""
    print(f"Formatting '{args.file}', fmt={format}{extra} size={size}")
    return STATUS_OK


def _human(size: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            return f"{size / (1 << shift):.3g} {unit}"
    return f"{size} B"


def _image_info(path: str, format: str | None) -> dict:
    format = format or probe_format(path)
    stat = os.stat(path)
    info = {"filename": path, "format": format, "actual-size": stat.st_blocks * 512}
    if format != "vhd":
        info["virtual-size"] = stat.st_size
        return info
    meta = vhd.inspect_vhd(path, lock=False)
    if meta.errors:
        raise ImageFormatError(f"{path}: {meta.errors[0]}")
    footer = meta.footer
    info.update({
        "virtual-size": footer.current_size,
        "subformat": vhd.DISK_TYPES[footer.disk_type],
        "uuid": str(vhd.uuid_module.UUID(bytes=footer.uuid)),
        "created": vhd.timestamp_text(footer.timestamp),
        "creator": footer.creator.decode("latin-1").rstrip("\0 "),
        "geometry": dict(zip(("cylinders", "heads", "sectors"), footer.geometry)),
    })
    if meta.header is not None:
        info["block-size"] = meta.header.block_size
        info["allocated-blocks"] = sum(entry != vhd.UNUSED for entry in meta.bat)
        info["blocks"] = meta.blocks
    if footer.disk_type == vhd.DIFFERENCING:
        candidates = vhd.parent_candidates(meta)
        info["parent"] = {
            "name": meta.header.parent_name,
            "uuid": str(vhd.uuid_module.UUID(bytes=meta.header.parent_uuid)),
            "locators": {code.decode(): vhd._decode_path(data)
                         for code, data in meta.locator_data.items()
                         if code in (vhd.W2RU, vhd.W2KU)},
            "path": next((p for p in candidates if os.path.isfile(p)), None),
        }
    problems = [p.message for p in meta.problems]
    if problems:
        info["problems"] = problems
    return info


def cmd_info(args) -> int:
    info = _image_info(args.file, args.format)
    if args.json:
        print(json.dumps(info, indent=2))
        return STATUS_OK
    lines = [f"image: {info['filename']}", f"file format: {info['format']}",
             f"virtual size: {_human(info['virtual-size'])} ({info['virtual-size']} bytes)",
             f"disk size: {_human(info['actual-size'])}"]
    if "subformat" in info:
        lines += [f"subformat: {info['subformat']}", f"uuid: {info['uuid']}",
                  f"created: {info['created']} by {info['creator']!r}",
                  "geometry: {cylinders}/{heads}/{sectors} (C/H/S)".format(**info["geometry"])]
    if "block-size" in info:
        lines.append(f"block size: {_human(info['block-size'])}, {info['allocated-blocks']} "
                     f"of {info['blocks']} blocks allocated")
    if "parent" in info:
        parent = info["parent"]
        lines.append(f"parent: {parent['path'] or parent['name'] + ' (not found)'} "
                     f"(uuid {parent['uuid']})")
    lines += [f"problem: {problem}" for problem in info.get("problems", [])]
    print("\n".join(lines))
    return STATUS_OK


def cmd_check(args) -> int:
    format = args.format or probe_format(args.file)
    if format != "vhd":
        print(f"{args.file}: a {format} image has no metadata to check")
        return STATUS_OK
    result = vhd.check_vhd(args.file, repair=args.repair)
    for message in result.errors:
        print(f"ERROR: {message}")
    for message in result.leaks:
        print(f"Leaked: {message}")
    for message in result.stale:
        print(f"Stale: {message}")
    for message in result.repaired:
        print(f"Repaired: {message}")
    if result.blocks:
        print(f"{result.allocated}/{result.blocks} blocks allocated")
    if result.errors:
        print(f"{len(result.errors)} errors were found on the image; it cannot be repaired "
              "safely" + (" (nothing was written)" if args.repair else ""))
        return STATUS_BAD_IMAGE
    if result.leaks or result.stale:
        print("No errors were found on the image; hvvmm img check -r repairs the rest.")
        return STATUS_DIFFERENT
    print("No errors were found on the image.")
    return STATUS_OK


def cmd_convert(args) -> int:
    options = _options(args.options)
    if os.path.exists(args.target) and os.path.samefile(args.source, args.target):
        raise UsageError("hvvmm img convert: the source and the target are the same file")
    with open_image(args.source, args.format, read_only=True) as source:
        _create(args.target, args.output_format, source.size, options)
        with open_image(args.target, args.output_format) as target:
            total = source.size // SECTOR_SIZE
            for sector in range(0, total, CHUNK_SECTORS):
                count = min(CHUNK_SECTORS, total - sector)
                data = source.read(sector, count)
                if data.count(0) != len(data):   # a new image reads as zeros already
                    target.write(sector, data)
            target.flush()
    return STATUS_OK


def cmd_compare(args) -> int:
    with open_image(args.a, args.format_a, read_only=True) as a, \
            open_image(args.b, args.format_b, read_only=True) as b:
        common = min(a.size, b.size) // SECTOR_SIZE
        for sector in range(0, common, CHUNK_SECTORS):
            count = min(CHUNK_SECTORS, common - sector)
            left, right = a.read(sector, count), b.read(sector, count)
            if left != right:
                at = next(i for i in range(len(left)) if left[i] != right[i])
                print(f"Content mismatch at offset {sector * SECTOR_SIZE + at}!")
                return STATUS_DIFFERENT
        larger = a if a.size > b.size else b
        for sector in range(common, larger.size // SECTOR_SIZE, CHUNK_SECTORS):
            count = min(CHUNK_SECTORS, larger.size // SECTOR_SIZE - sector)
            data = larger.read(sector, count)
            if data.count(0) != len(data):
                at = next(i for i in range(len(data)) if data[i])
                print(f"Content mismatch at offset {sector * SECTOR_SIZE + at} (past the end "
                      "of the smaller image)!")
                return STATUS_DIFFERENT
    if a.size != b.size:
        print("Warning: the images have different sizes; the larger one holds only zeros "
              "past the other's end")
    print("Images are identical.")
    return STATUS_OK


def cmd_commit(args) -> int:
    with vhd.VhdBackend(args.file, read_only=True, parent_read_only=False) as child:
        if child.parent is None:
            raise UsageError(f"hvvmm img commit: {args.file} is a {child.subformat} image, not a "
                             "differencing one")
        for block in child.allocated_blocks():
            for sector, count in child.present_runs(block):
                child.parent.write(sector, child.read(sector, count))
        child.parent.flush()
        print(f"Image committed into {child.parent.path}.")
    return STATUS_OK


COMMANDS = {"create": cmd_create, "info": cmd_info, "check": cmd_check, "convert": cmd_convert,
            "compare": cmd_compare, "commit": cmd_commit}


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return STATUS_USAGE
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return STATUS_USAGE
    except ImageFormatError as exc:
        print(f"hvvmm img: bad image: {exc}", file=sys.stderr)
        return STATUS_BAD_IMAGE
    except OSError as exc:   # BlockError, ImageLockedError, a missing file
        message = exc.strerror if isinstance(exc, BlockError) and exc.strerror else exc
        if not isinstance(exc, BlockError) and exc.filename:
            message = f"{exc.filename}: {exc.strerror}"
        print(f"hvvmm img: error: {message}", file=sys.stderr)
        return STATUS_IO_ERROR
    except KeyboardInterrupt:
        print("hvvmm img: interrupted", file=sys.stderr)
        return 130
