"""The `Codec` port: the checkpoint and backup XML codecs behind one object."""

from __future__ import annotations

from vcfs.adapters import backupxml, xmlcodec


class XmlCodec:
    """Every XML document vcfs reads or writes. Stateless; any thread."""

    document_complete = staticmethod(xmlcodec.document_complete)
    parse_checkpoint = staticmethod(xmlcodec.parse_checkpoint)
    format_checkpoint = staticmethod(xmlcodec.format_checkpoint)
    format_domain = staticmethod(xmlcodec.format_domain)
    parse_domain = staticmethod(xmlcodec.parse_domain)
    parse_backup = staticmethod(backupxml.parse_backup)
    format_backup = staticmethod(backupxml.format_backup)
