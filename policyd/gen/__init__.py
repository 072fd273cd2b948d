"""Generated code lives below this package; see scripts/gen_proto.py."""
