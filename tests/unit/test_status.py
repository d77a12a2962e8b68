"""The `status` file format: what the backup service renders, the client commands parse."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vcfs.domain import status
from vcfs.domain.status import DiskProgress, JobStatus


def test_parse_reads_every_key():
    s = status.parse("state: failed\nmode: push\ndisk vda: 10/20\ndisk vdb: 0/5\n"
                     "error: disk vda: No space left on device\n")
    assert (s.state, s.mode, s.error) == ("failed", "push", "disk vda: No space left on device")
    assert s.disks == [DiskProgress("vda", 10, 20), DiskProgress("vdb", 0, 5)]
    s = status.parse("state: running\nmode: pull\ndisk vda: 3/4\nnbd-read: 7\n")
    assert s.nbd_read == 7 and s.error is None
    with pytest.raises(ValueError):
        status.parse("hello\n")


def test_render_writes_the_documented_lines_in_order():
    s = JobStatus(status.RUNNING, "pull", [DiskProgress("vda", 1, 4), DiskProgress("vdb", 0, 8)],
                  nbd_read=65536)
    assert status.render(s) == ("state: running\nmode: pull\ndisk vda: 1/4\ndisk vdb: 0/8\n"
                                "nbd-read: 65536\n")
    s = JobStatus(status.FAILED, "push", [DiskProgress("vda", 0, 4)], error="disk vda: boom")
    assert status.render(s) == "state: failed\nmode: push\ndisk vda: 0/4\nerror: disk vda: boom\n"


def test_a_multi_line_error_stays_one_line():
    # Otherwise the error's second line would be read as a key of its own.
    s = JobStatus(status.FAILED, "push", error="qemu said:\nstate: running")
    text = status.render(s)
    assert text == "state: failed\nmode: push\nerror: qemu said: state: running\n"
    assert status.parse(text).state == status.FAILED


names = st.from_regex(r"[a-zA-Z0-9_-]{1,8}", fullmatch=True)
sizes = st.integers(min_value=0, max_value=1 << 62)
one_line = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1).map(
    status.one_line).filter(lambda t: t == t.strip() and t)


@given(st.builds(
    JobStatus, st.sampled_from(status.STATES), st.sampled_from(["pull", "push"]),
    st.lists(st.builds(DiskProgress, names, sizes, sizes), max_size=4),
    st.none() | sizes, st.none() | one_line, st.dictionaries(names, sizes, max_size=4),
))
def test_parse_reads_back_what_render_writes(s):
    assert status.parse(status.render(s)) == s
