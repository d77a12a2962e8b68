"""Tests for vcfs.adapters.backupxml: libvirt conformance, schema checks and hostile input."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import conformance
from vcfs.adapters.backupxml import format_backup, parse_backup
from vcfs.adapters.xmlcodec import MAX_DOCUMENT
from vcfs.domain.align import align_backup
from vcfs.domain.model import (
    FULL,
    INCREMENTAL,
    NO,
    PULL,
    PUSH,
    BackupDef,
    BackupDisk,
    BackupServer,
    BackupStore,
    CheckpointDef,
    CheckpointDisk,
    DiskRef,
)
from vcfs.errors import InvalidInput, TooLarge

# libvirt's fixtures are read where they are (GPL test data, never copied into the repo); tests
# that need them take the `libvirt_data` fixture, which skips them where the data is absent.
IN = conformance.tests_dir() / "domainbackupxml2xmlin"
OUT = conformance.tests_dir() / "domainbackupxml2xmlout"

IN_OUT_CASES = conformance.cases(IN, "*.xml", paired_with=OUT)
INTERNAL_CASES = {"backup-pull-internal-invalid"}


def invalid(data: bytes | str, match: str | None = None, *, internal: bool = False) -> str:
    """Assert parse_backup rejects `data` with a one-line InvalidInput; return the message."""
    if isinstance(data, str):
        data = data.encode()
    with pytest.raises(InvalidInput, match=match) as info:
        parse_backup(data, internal=internal)
    message = str(info.value)
    assert message and "\n" not in message
    return message


def push(body: str) -> bytes:
    """A push `<domainbackup>` with the given inner XML."""
    return f"<domainbackup mode='push'>{body}</domainbackup>".encode()


def pull(body: str) -> bytes:
    """A pull `<domainbackup>` with the given inner XML."""
    return f"<domainbackup mode='pull'>{body}</domainbackup>".encode()


# --- libvirt conformance ----------------------------------------------------------------------


def fake_domain(backup: BackupDef) -> list[DiskRef]:
    """The domain genericxml2xmltest.c aligns against (SOURCE.md), with what the fixtures imply.

    SOURCE.md: one qcow2 file disk per disk named in the input, source `/fake/<name>.qcow2`,
    plus `vdextradisk`. The fixtures settle the rest:
    - `vdextradisk` is built the same way (empty.xml backs it up to
      `/fake/vdextradisk.qcow2.SUFFIX`) and comes last in domain order;
    - no disk is read-only or empty (empty.xml, with no <disks>, backs vdextradisk up);
    - a disk named with backup='no' (`hda`) is still a domain disk: it is listed, not appended;
    - with no <disks>, the domain holds vdextradisk alone (empty.xml lists nothing else);
    - the status-XML case is formatted with the internal flag too (its output keeps `state`
      and `<privateData>`).
    """
    names = [d.name for d in backup.disks or ()] + ["vdextradisk"]
    return [DiskRef(name, f"/fake/{name}.qcow2") for name in names]


def libvirt_round(data: bytes, case: str) -> bytes:
    """Parse, align against the fake domain with suffix SUFFIX, and format, as libvirt's test."""
    internal = case in INTERNAL_CASES
    backup = parse_backup(data, internal=internal)
    return format_backup(align_backup(backup, fake_domain(backup), "SUFFIX"), internal=internal)


def test_fixtures_are_all_found(libvirt_data):
    assert len(IN_OUT_CASES) == 10
    assert INTERNAL_CASES <= set(IN_OUT_CASES)
    assert "empty" in IN_OUT_CASES


@pytest.mark.parametrize("case", IN_OUT_CASES)
def test_libvirt_in_to_out(case, libvirt_data):
    expected = (OUT / f"{case}.xml").read_bytes()
    assert libvirt_round((IN / f"{case}.xml").read_bytes(), case) == expected


@pytest.mark.parametrize("case", IN_OUT_CASES)
def test_libvirt_out_is_a_fixed_point(case, libvirt_data):
    # An aligned document reads back and aligns to itself: nothing is lost or re-defaulted.
    expected = (OUT / f"{case}.xml").read_bytes()
    assert libvirt_round(expected, case) == expected


def test_internal_fixture_needs_the_internal_flag(libvirt_data):
    data = (IN / "backup-pull-internal-invalid.xml").read_bytes()
    invalid(data, "unknown element <privateData> in <domainbackup>")
    start = data.index(b"  <privateData>")
    without_private = data[:start] + data[data.index(b"</domainbackup>") :]
    invalid(without_private, "unknown attribute 'state' on <disk>")
    backup = parse_backup(data, internal=True)
    assert [d.state for d in backup.disks] == ["running", "complete", "running"]
    assert backup.private_data is not None and b"test-tlskey" in backup.private_data
    # Without the flag, the status-only parts are not written.
    text = format_backup(backup).decode()
    assert "state=" not in text and "privateData" not in text


def test_fixture_values_are_parsed(libvirt_data):
    backup = parse_backup((IN / "backup-pull-encrypted.xml").read_bytes())
    assert backup.mode == PULL
    assert backup.incremental == "1525889631"
    assert backup.server == BackupServer("tcp", name="localhost", port=10809, tls="yes")
    vda, vdb, vdc = backup.disks
    assert vda == BackupDisk(
        "vda",
        type="file",
        exportname="test-vda",
        exportbitmap="blah",
        driver="qcow2",
        store=BackupStore(
            "/path/to/file",
            "file",
            b"<encryption format='luks'>\n"
            b"  <secret type='passphrase' uuid='0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f'/>\n"
            b"</encryption>\n",
        ),
    )
    assert vdc.type == "block" and vdc.store.kind == "block" and vdc.store.path == "/dev/block"
    assert vdb.backupmode is None and vdb.incremental is None  # defaults come from alignment
    unix = parse_backup((IN / "backup-pull-unix.xml").read_bytes())
    assert unix.server == BackupServer("unix", socket="/path/to/server")
    fd = parse_backup((IN / "backup-pull-fd.xml").read_bytes())
    assert fd.server == BackupServer("fd", fdgroup="nbdfd")
    assert parse_backup((IN / "empty.xml").read_bytes()) == BackupDef()


# --- parsing ----------------------------------------------------------------------------------


def test_defaults_and_absent_versus_empty():
    assert parse_backup(b"<domainbackup/>") == BackupDef(mode=PUSH, disks=None)
    assert parse_backup(push("<disks/>")).disks == ()
    assert parse_backup(push("<incremental></incremental>")).incremental is None
    assert parse_backup(pull("")) == BackupDef(mode=PULL)  # vcfs allows a pull without server
    assert parse_backup(pull("<server/>")).server == BackupServer()  # name and port filled later


def test_backup_no_reads_nothing_else():
    data = push(
        "<disks><disk name='vda' backup='no' type='bogus' backupmode='x'><driver/></disk></disks>"
    )
    assert parse_backup(data).disks == (BackupDisk("vda", backup=False),)
    # Names are still checked: an unknown attribute is unknown whatever the backup value.
    invalid(push("<disks><disk name='vda' backup='no' colour='red'/></disks>"), "'colour'")


def test_export_names_are_pull_only():
    disk = "<disks><disk name='vda' exportname='e' exportbitmap='b'/></disks>"
    assert parse_backup(push(disk)).disks[0].exportname is None
    parsed = parse_backup(pull(disk)).disks[0]
    assert (parsed.exportname, parsed.exportbitmap) == ("e", "b")


def test_disk_attributes():
    disk = parse_backup(
        push(
            "<disks><disk name='vda' backup='yes' backupmode='incremental' incremental='c1' "
            "index='7' type='block'><driver type='raw'/><target dev='/dev/x'/></disk></disks>"
        )
    ).disks[0]
    assert disk == BackupDisk(
        "vda",
        True,
        "block",
        INCREMENTAL,
        "c1",
        index=7,
        driver="raw",
        store=BackupStore("/dev/x", "block"),
    )
    # An empty checkpoint name is no name, as for <incremental>.
    assert parse_backup(push("<disks><disk name='vda' incremental=''/></disks>")).disks[0] == (
        BackupDisk("vda")
    )


def test_store_children_kept_verbatim_with_comments_and_namespaces():
    data = push(
        "<disks><disk name='vda'><target file='/b'><!-- c --><seclabel model='dac'>"
        "<label>+0:+0</label></seclabel><seclabel xmlns:x='urn:x' x:a='1'/>"
        "</target></disk></disks>"
    )
    store = parse_backup(data).disks[0].store
    assert store.extra == (
        b"<seclabel model='dac'>\n  <label>+0:+0</label>\n</seclabel>\n"
        b"<seclabel x:a='1' xmlns:x='urn:x'/>\n"
    )
    assert format_backup(parse_backup(data)) == (
        b"<domainbackup mode='push'>\n"
        b"  <disks>\n"
        b"    <disk name='vda' backup='yes' type='file'>\n"
        b"      <target file='/b'>\n"
        b"        <seclabel model='dac'>\n"
        b"          <label>+0:+0</label>\n"
        b"        </seclabel>\n"
        b"        <seclabel x:a='1' xmlns:x='urn:x'/>\n"
        b"      </target>\n"
        b"    </disk>\n"
        b"  </disks>\n"
        b"</domainbackup>\n"
    )


def test_children_in_any_order_and_comments():
    data = pull(
        "<!-- a --><disks><disk name='vda'><scratch file='/s'/><driver type='qcow2'/></disk>"
        "</disks><?pi x?><server transport='unix' socket='/sock'/><incremental>c</incremental>"
    )
    backup = parse_backup(data)
    assert backup.incremental == "c" and backup.server.socket == "/sock"
    assert backup.disks[0].driver == "qcow2" and backup.disks[0].store.path == "/s"


def test_server_values():
    server = parse_backup(pull("<server name='::1' port='65535' tls='no'/>")).server
    assert server == BackupServer("tcp", name="::1", port=65535, tls="no")
    assert parse_backup(pull("<server transport='tcp' port='1'/>")).server.port == 1
    assert parse_backup(pull("<server transport='unix' socket='/s' tls='yes'/>")).server.tls == (
        "yes"
    )


SCHEMA_VIOLATIONS = [
    # Root.
    ("<domainbackup mode='bogus'/>", "unknown backup mode 'bogus'"),
    ("<domainbackup mode=''/>", "unknown backup mode ''"),
    ("<domainbackup type='push'/>", "unknown attribute 'type' on <domainbackup>"),
    ("<domaincheckpoint/>", "expected a <domainbackup> document"),
    (push("<bogus/>"), "unknown element <bogus> in <domainbackup>"),
    (push("<incremental>a</incremental><incremental>b</incremental>"), "duplicate element"),
    (push("<incremental><name>a</name></incremental>"), "unexpected element <name>"),
    (push("<incremental x='1'>a</incremental>"), "unknown attribute 'x' on <incremental>"),
    (push("text"), "unexpected text in <domainbackup>"),
    (push("<disks x='1'/>"), "unknown attribute 'x' on <disks>"),
    (push("<disks><volume name='vda'/></disks>"), "unknown element <volume> in <disks>"),
    (push("<disks>text</disks>"), "unexpected text in <disks>"),
    # Server.
    (push("<server name='localhost' port='10809'/>"), "use of <server> requires pull mode backup"),
    ("<domainbackup><server/></domainbackup>", "use of <server> requires pull mode backup"),
    (pull("<server transport='rdma' name='h'/>"), "transport rdma is not supported for <server>"),
    (pull("<server transport='udp'/>"), "unknown transport 'udp' for <server>"),
    (
        pull("<server transport='unix' socket='rel/sock'/>"),
        "backup socket path 'rel/sock' must be absolute",
    ),
    (pull("<server transport='unix'/>"), "missing socket for unix transport"),
    (pull("<server transport='fd'/>"), "missing fdgroup for fd transport"),
    (pull("<server transport='fd' fdgroup=''/>"), "missing fdgroup for fd transport"),
    (pull("<server socket='/s'/>"), "'socket' is not allowed on <server> with transport 'tcp'"),
    (pull("<server transport='unix' socket='/s' port='1'/>"), "'port' is not allowed"),
    (pull("<server transport='fd' fdgroup='g' name='h'/>"), "'name' is not allowed"),
    (pull("<server port='0'/>"), "invalid server port '0'"),
    (pull("<server port='65536'/>"), "invalid server port '65536'"),
    (pull("<server port='-1'/>"), "invalid server port '-1'"),
    (pull("<server port='http'/>"), "invalid server port 'http'"),
    (pull("<server tls='maybe'/>"), "invalid tls 'maybe' on <server>"),
    (pull("<server name='a b'/>"), "invalid server name 'a b'"),
    (pull("<server name=''/>"), "invalid server name ''"),
    (pull("<server><x/></server>"), "<server> takes no child elements"),
    # Disks.
    (push("<disks><disk/></disks>"), "missing name from disk backup element"),
    (push("<disks><disk backup='no'/></disks>"), "missing name from disk backup element"),
    (push("<disks><disk name='/var/lib/a.qcow2'/></disks>"), "invalid disk name"),
    (push("<disks><disk name=''/></disks>"), "invalid disk name ''"),
    (push("<disks><disk name='vda' backup='maybe'/></disks>"), "invalid backup 'maybe'"),
    (push("<disks><disk name='vda' backupmode='diff'/></disks>"), "invalid backupmode 'diff'"),
    (
        push("<disks><disk name='vda' type='network'/></disks>"),
        "unsupported disk backup type 'network'",
    ),
    (push("<disks><disk name='vda' index='x'/></disks>"), "invalid index of disk 'vda'"),
    (push("<disks><disk name='vda' index='4294967296'/></disks>"), "invalid index"),
    (push("<disks><disk name='vda' state='running'/></disks>"), "unknown attribute 'state'"),
    (push("<disks><disk name='vda'>text</disk></disks>"), "unexpected text in <disk>"),
    (
        push("<disks><disk name='vda'><source file='/a'/></disk></disks>"),
        "unknown element <source> in <disk>",
    ),
    (
        push("<disks><disk name='vda'><scratch file='/a'/></disk></disks>"),
        "unknown element <scratch> in <disk>",
    ),
    (
        pull("<disks><disk name='vda'><target file='/a'/></disk></disks>"),
        "unknown element <target> in <disk>",
    ),
    (
        push("<disks><disk name='vda'><driver type='raw'/><driver type='raw'/></disk></disks>"),
        "duplicate element <driver>",
    ),
    # Driver.
    (
        pull("<disks><disk name='vda'><driver type='raw'/></disk></disks>"),
        "pull mode backup for disk 'vda' requires qcow2 driver",
    ),
    (
        push("<disks><disk name='vda'><driver type='qcow3'/></disk></disks>"),
        "unknown driver type 'qcow3' for disk 'vda'",
    ),
    (push("<disks><disk name='vda'><driver/></disk></disks>"), "needs a type attribute"),
    (
        push("<disks><disk name='vda'><driver type='raw' name='qemu'/></disk></disks>"),
        "unknown attribute 'name' on <driver>",
    ),
    (
        push("<disks><disk name='vda'><driver type='raw'><x/></driver></disk></disks>"),
        "<driver> takes no child elements",
    ),
    # Stores.
    (
        push("<disks><disk name='vda'><target file='rel'/></disk></disks>"),
        "target path 'rel' of disk 'vda' must be absolute",
    ),
    (pull("<disks><disk name='vda'><scratch dev=''/></disk></disks>"), "must be absolute"),
    (push("<disks><disk name='vda'><target/></disk></disks>"), "needs one of file= or dev="),
    (
        push("<disks><disk name='vda'><target file='/a' dev='/b'/></disk></disks>"),
        "needs one of file= or dev=",
    ),
    (
        push("<disks><disk name='vda'><target path='/a'/></disk></disks>"),
        "unknown attribute 'path' on <target>",
    ),
    (
        push("<disks><disk name='vda' type='block'><target file='/a'/></disk></disks>"),
        "disk 'vda' of type 'block' needs <target dev=>",
    ),
    (
        pull("<disks><disk name='vda' type='file'><scratch dev='/a'/></disk></disks>"),
        "disk 'vda' of type 'file' needs <scratch file=>",
    ),
    (
        pull("<disks><disk name='vda' type='block'/></disks>"),
        "pull mode backup of block disk 'vda' requires <scratch dev=>",
    ),
    (
        push("<disks><disk name='vda'><target file='/a'><label/></target></disk></disks>"),
        "unknown element <label> in <target>",
    ),
    (
        push(
            "<disks><disk name='vda'><target file='/a'><encryption/><encryption/></target>"
            "</disk></disks>"
        ),
        "duplicate element <encryption> in <target>",
    ),
    # Internal-only parts.
    (push("<privateData/>"), "unknown element <privateData> in <domainbackup>"),
    # Combined form: the checkpoint is validated like a create request.
    (push("<domaincheckpoint><name>../x</name></domaincheckpoint>"), "invalid checkpoint name"),
    (push("<domaincheckpoint><bogus/></domaincheckpoint>"), "unknown element <bogus>"),
    (push("<domaincheckpoint/><domaincheckpoint/>"), "duplicate element <domaincheckpoint>"),
]


@pytest.mark.parametrize(("data", "match"), SCHEMA_VIOLATIONS)
def test_schema_violations(data, match):
    invalid(data, match)


def test_internal_state_values():
    data = push("<disks><disk name='vda' state='paused'/></disks>")
    invalid(data, "invalid state 'paused' on <disk>", internal=True)
    ok = parse_backup(data.replace(b"paused", b"cancelled"), internal=True)
    assert ok.disks[0].state == "cancelled"


def test_hostile_values_give_one_line_messages():
    invalid(b"<domainbackup mode='a&#10;b'/>", r"unknown backup mode 'a\\nb'")
    invalid(pull("<server transport='unix' socket='x&#10;y'/>"), "must be absolute")


def test_namespaced_names_are_unknown():
    invalid(push("<x:disks xmlns:x='urn:x'/>"), "unknown element")
    invalid(
        push("<disks><disk name='vda' xmlns:x='urn:x' x:name='a'/></disks>"), "unknown attribute"
    )
    invalid(b"<domainbackup xmlns='urn:x'/>", "expected a <domainbackup> document")


# --- combined form ----------------------------------------------------------------------------


def test_combined_checkpoint_child():
    data = push(
        "<domaincheckpoint><name>c2</name><description>nightly</description>"
        "<parent><name>c1</name></parent><creationTime>5</creationTime>"
        "<disks><disk name='vda'/><disk name='vdb' checkpoint='no'/></disks>"
        "</domaincheckpoint><incremental>c1</incremental>"
    )
    backup = parse_backup(data)
    # Create mode: parent and creationTime are validated but dropped.
    assert backup.checkpoint == CheckpointDef(
        name="c2",
        description="nightly",
        disks=(CheckpointDisk("vda"), CheckpointDisk("vdb", NO)),
    )
    assert backup.incremental == "c1"
    # The live backup's checkpoint is shown elsewhere: the backup document omits it.
    assert format_backup(backup) == (
        b"<domainbackup mode='push'>\n  <incremental>c1</incremental>\n</domainbackup>\n"
    )
    assert parse_backup(push("<domaincheckpoint/>")).checkpoint == CheckpointDef()


# --- formatting -------------------------------------------------------------------------------


def test_format_minimal():
    assert format_backup(BackupDef()) == b"<domainbackup mode='push'/>\n"
    assert format_backup(BackupDef(mode=PULL, disks=())) == b"<domainbackup mode='pull'/>\n"


def test_format_server_attribute_order():
    def server_line(server: BackupServer) -> bytes:
        return format_backup(BackupDef(mode=PULL, server=server)).splitlines()[1]

    assert server_line(BackupServer("tcp", name="h", port=10809, tls="no")) == (
        b"  <server transport='tcp' tls='no' name='h' port='10809'/>"
    )
    assert server_line(BackupServer()) == b"  <server transport='tcp'/>"
    assert server_line(BackupServer("unix", socket="/s", tls="yes")) == (
        b"  <server transport='unix' tls='yes' socket='/s'/>"
    )
    assert server_line(BackupServer("fd", fdgroup="g")) == b"  <server transport='fd' fdgroup='g'/>"


def test_format_disk_attribute_order_and_escaping():
    disk = BackupDisk(
        "vda",
        type="file",
        backupmode=INCREMENTAL,
        incremental="c'1",
        exportname="e<>",
        exportbitmap="b&",
        index=3,
        state="failed",
        driver="qcow2",
        store=BackupStore("/a b/'x'", "file"),
    )
    backup = BackupDef(mode=PULL, incremental="c&1", disks=(disk, BackupDisk("vdb", False)))
    assert format_backup(backup, internal=True) == (
        b"<domainbackup mode='pull'>\n"
        b"  <incremental>c&amp;1</incremental>\n"
        b"  <disks>\n"
        b"    <disk name='vda' backup='yes' state='failed' type='file' backupmode='incremental'"
        b" incremental='c&apos;1' exportname='e&lt;&gt;' exportbitmap='b&amp;' index='3'>\n"
        b"      <driver type='qcow2'/>\n"
        b"      <scratch file='/a b/&apos;x&apos;'/>\n"
        b"    </disk>\n"
        b"    <disk name='vdb' backup='no'/>\n"
        b"  </disks>\n"
        b"</domainbackup>\n"
    )
    # Not internal: no state. Push: the store is a <target>. Zero index: not written.
    pushed = format_backup(BackupDef(disks=(disk.__class__("vda", index=0, state="failed"),)))
    assert pushed == (
        b"<domainbackup mode='push'>\n  <disks>\n"
        b"    <disk name='vda' backup='yes' type='file'/>\n"
        b"  </disks>\n</domainbackup>\n"
    )


def test_format_type_falls_back_to_the_store_kind():
    disk = BackupDisk("vda", store=BackupStore("/dev/sdb", "block"))
    assert b"<disk name='vda' backup='yes' type='block'>" in format_backup(BackupDef(disks=(disk,)))
    assert b"<target dev='/dev/sdb'/>" in format_backup(BackupDef(disks=(disk,)))


def test_format_private_data_only_when_internal():
    data = push("<privateData><objects><TLSx509 alias='a'/></objects></privateData>")
    backup = parse_backup(data, internal=True)
    assert format_backup(backup, internal=True) == (
        b"<domainbackup mode='push'>\n"
        b"  <privateData>\n    <objects>\n      <TLSx509 alias='a'/>\n    </objects>\n"
        b"  </privateData>\n"
        b"</domainbackup>\n"
    )
    assert format_backup(backup) == b"<domainbackup mode='push'/>\n"


# --- hostile input ----------------------------------------------------------------------------

BILLION_LAUGHS = (
    b'<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol "lol">\n'
    + b"".join(
        f' <!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">\n'.encode()
        for i in range(1, 10)
    )
    + b"]>\n<domainbackup><incremental>&lol9;</incremental></domainbackup>\n"
)

HOSTILE = {
    "billion-laughs": BILLION_LAUGHS,
    "external-entity": (
        b'<!DOCTYPE domainbackup [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
        b"<domainbackup><incremental>&xxe;</incremental></domainbackup>"
    ),
    "doctype": b"<!DOCTYPE domainbackup><domainbackup/>",
    "undefined-entity": push("<incremental>&xxe;</incremental>"),
    "entity-in-attribute": b"<domainbackup mode='&xxe;'/>",
    "invalid-utf8": push("<incremental>x</incremental>").replace(b"x", b"\xff\xfe"),
    "overlong-utf8": push("<incremental>x</incremental>").replace(b"x", b"\xc0\xaf"),
    "nul": push("<incremental>a\0b</incremental>"),
    "trailing-garbage": push("") + b"garbage",
    "unclosed": b"<domainbackup><disks>",
    "deep-store-children": push(
        "<disks><disk name='vda'><target file='/a'><seclabel>"
        + "<a>" * 100_000
        + "</a>" * 100_000
        + "</seclabel></target></disk></disks>"
    ),
    "empty": b"",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_input_is_rejected_quickly(name):
    start = time.monotonic()
    for internal in (False, True):
        invalid(HOSTILE[name], internal=internal)
    assert time.monotonic() - start < 2


def test_doctype_and_utf8_messages():
    invalid(BILLION_LAUGHS, "DOCTYPE")
    invalid(HOSTILE["invalid-utf8"], "invalid UTF-8")


def test_too_large():
    with pytest.raises(TooLarge):
        parse_backup(push(" " * MAX_DOCUMENT))
    exact = push(" " * (MAX_DOCUMENT - len(push(""))))
    assert len(exact) == MAX_DOCUMENT
    assert parse_backup(exact) == BackupDef()


# --- properties -------------------------------------------------------------------------------

XML_TOKENS = st.sampled_from(
    """<domainbackup> </domainbackup> <domainbackup mode='pull'> <disks> </disks> <disk/>
    <disk name='vda'/> <disk name='vda' backup='no'> </disk> <target file='/a'/> <scratch dev='/b'/>
    <driver type='raw'/> <server/> <server transport='unix' socket='x'/> <incremental>
    </incremental> <privateData> </privateData> <domaincheckpoint> </domaincheckpoint>
    <seclabel/> c1 < > & &amp; &x; <!-- --> <!DOCTYPE <!ENTITY ]> é /> ' \"""".split()
    + [" ", "\n", "\x00", "\udcff"]
)


def check_only_expected_errors(data: bytes) -> None:
    """parse_backup either answers or raises a one-line InvalidInput / TooLarge, nothing else."""
    for internal in (False, True):
        try:
            backup = parse_backup(data, internal=internal)
        except (InvalidInput, TooLarge) as e:
            assert "\n" not in str(e)
        else:
            assert isinstance(backup, BackupDef)
            format_backup(backup, internal=internal)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes(data):
    check_only_expected_errors(data)


@settings(max_examples=300, deadline=None)
@given(st.lists(XML_TOKENS, max_size=30))
def test_random_xml_like(tokens):
    check_only_expected_errors("".join(tokens).encode("utf-8", "surrogatepass"))


NAMES = st.from_regex(r"[a-zA-Z0-9_-]{1,8}", fullmatch=True)
PATHS = NAMES.map(lambda n: f"/{n}")


@st.composite
def backups(draw: st.DrawFn) -> BackupDef:
    """Random well-formed, already-aligned backup definitions."""
    mode = draw(st.sampled_from([PUSH, PULL]))
    disks = []
    for name in draw(st.lists(NAMES, max_size=4, unique=True)):
        if not draw(st.booleans()):
            disks.append(BackupDisk(name, backup=False))
            continue
        kind = draw(st.sampled_from(["file", "block"]))
        backupmode = draw(st.sampled_from([FULL, INCREMENTAL]))
        disks.append(
            BackupDisk(
                name,
                type=kind,
                backupmode=backupmode,
                incremental=draw(NAMES) if backupmode == INCREMENTAL else None,
                exportname=draw(st.none() | NAMES) if mode == PULL else None,
                exportbitmap=draw(st.none() | NAMES) if mode == PULL else None,
                index=draw(st.none() | st.integers(1, 2**32 - 1)),
                driver=draw(st.none() | st.just("qcow2")),
                store=BackupStore(draw(PATHS), kind),
            )
        )
    server = None
    if mode == PULL:
        server = draw(
            st.none()
            | st.builds(
                BackupServer, st.just("tcp"), st.none() | NAMES, st.none() | st.integers(1, 65535)
            )
            | st.builds(BackupServer, st.just("unix"), socket=PATHS)
        )
    return BackupDef(mode, draw(st.none() | NAMES), server, tuple(disks) or None)


@settings(max_examples=200, deadline=None)
@given(backups())
def test_format_parse_round_trip(backup):
    assert parse_backup(format_backup(backup)) == backup
