"""The record schema of YouTube-8M TFRecords as this project's own protobuf messages, without TensorFlow.

YouTube-8M stores each video as a ``tf.train.Example`` (video level) or ``tf.train.SequenceExample`` (frame level).
Only their wire format matters to a reader, and it is small and documented: the messages below have the same
field numbers and types, so bytes written by TensorFlow parse here and bytes written here parse in TensorFlow.
Importing TensorFlow just for these classes costs seconds and dozens of log lines in every worker process.

The file descriptor is built in code (no ``.proto`` file, no ``protoc``) and added to a private
``DescriptorPool``, under the package ``yt8m_cma.records``: TensorFlow's ``tensorflow.Example`` lives in the
default pool, so both can be imported in one process in either order.

Schema (proto3, like TensorFlow's)::

    BytesList     { repeated bytes value = 1; }
    FloatList     { repeated float value = 1 [packed]; }
    Int64List     { repeated int64 value = 1 [packed]; }
    Feature       { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3; } }
    Features      { map<string, Feature> feature = 1; }
    FeatureList   { repeated Feature feature = 1; }
    FeatureLists  { map<string, FeatureList> feature_list = 1; }
    Example       { Features features = 1; }
    SequenceExample { Features context = 1; FeatureLists feature_lists = 2; }

Use the classes like ``tf.train``'s: ``SequenceExample.FromString(data)``, ``Feature(bytes_list=BytesList(...))``,
``msg.SerializeToString(deterministic=True)`` (sorted map keys: byte for byte what TensorFlow's deterministic
serialization writes for the same content).
"""
from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "yt8m_cma.records"
FILE_NAME = "yt8m_cma/records/example.proto"

_F = descriptor_pb2.FieldDescriptorProto
_OPTIONAL, _REPEATED = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED


def _field(msg: descriptor_pb2.DescriptorProto, name: str, number: int, ftype: int, label: int = _OPTIONAL,
           type_name: str | None = None, packed: bool = False, oneof_index: int | None = None) -> None:
    field = msg.field.add(name=name, number=number, type=ftype, label=label)
    field.json_name = "".join(p.capitalize() if i else p for i, p in enumerate(name.split("_")))
    if type_name is not None:
        field.type_name = f".{PACKAGE}.{type_name}"
    if packed:
        field.options.packed = True
    if oneof_index is not None:
        field.oneof_index = oneof_index


def _map(msg: descriptor_pb2.DescriptorProto, name: str, number: int, value_type: str) -> None:
    """``map<string, value_type> name = number``: a repeated nested ``<Name>Entry {key = 1; value = 2}``."""
    entry_name = "".join(p.capitalize() for p in name.split("_")) + "Entry"
    entry = msg.nested_type.add(name=entry_name)
    entry.options.map_entry = True
    _field(entry, "key", 1, _F.TYPE_STRING)
    _field(entry, "value", 2, _F.TYPE_MESSAGE, type_name=value_type)
    _field(msg, name, number, _F.TYPE_MESSAGE, _REPEATED, type_name=f"{msg.name}.{entry_name}")


def build_file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """The schema as a ``FileDescriptorProto`` (a fresh copy on each call)."""
    fd = descriptor_pb2.FileDescriptorProto(name=FILE_NAME, package=PACKAGE, syntax="proto3")

    for name, ftype in (("BytesList", _F.TYPE_BYTES), ("FloatList", _F.TYPE_FLOAT), ("Int64List", _F.TYPE_INT64)):
        msg = fd.message_type.add(name=name)
        _field(msg, "value", 1, ftype, _REPEATED, packed=ftype != _F.TYPE_BYTES)

    feature = fd.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, (name, type_name) in enumerate(
            (("bytes_list", "BytesList"), ("float_list", "FloatList"), ("int64_list", "Int64List")), 1):
        _field(feature, name, number, _F.TYPE_MESSAGE, type_name=type_name, oneof_index=0)

    _map(fd.message_type.add(name="Features"), "feature", 1, "Feature")
    _field(fd.message_type.add(name="FeatureList"), "feature", 1, _F.TYPE_MESSAGE, _REPEATED, type_name="Feature")
    _map(fd.message_type.add(name="FeatureLists"), "feature_list", 1, "FeatureList")

    _field(fd.message_type.add(name="Example"), "features", 1, _F.TYPE_MESSAGE, type_name="Features")
    seq = fd.message_type.add(name="SequenceExample")
    _field(seq, "context", 1, _F.TYPE_MESSAGE, type_name="Features")
    _field(seq, "feature_lists", 2, _F.TYPE_MESSAGE, type_name="FeatureLists")
    return fd


POOL = descriptor_pool.DescriptorPool()  # private: never clashes with TensorFlow's tensorflow.* in the default pool
FILE_DESCRIPTOR = POOL.Add(build_file_descriptor())


def _message(name: str) -> type:
    descriptor = POOL.FindMessageTypeByName(f"{PACKAGE}.{name}")
    if hasattr(message_factory, "GetMessageClass"):  # protobuf >= 4.22
        return message_factory.GetMessageClass(descriptor)
    return message_factory.MessageFactory(POOL).GetPrototype(descriptor)  # pragma: no cover - older protobuf


BytesList = _message("BytesList")
FloatList = _message("FloatList")
Int64List = _message("Int64List")
Feature = _message("Feature")
Features = _message("Features")
FeatureList = _message("FeatureList")
FeatureLists = _message("FeatureLists")
Example = _message("Example")
SequenceExample = _message("SequenceExample")

__all__ = ["PACKAGE", "POOL", "FILE_DESCRIPTOR", "build_file_descriptor", "BytesList", "FloatList", "Int64List",
           "Feature", "Features", "FeatureList", "FeatureLists", "Example", "SequenceExample"]
