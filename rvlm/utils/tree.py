"""Pytree path helpers shared by the optimizer masks and the checkpoint checks."""


def key_name(key) -> str:
  """One path entry as text: dict key, attribute name or sequence index."""
  for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path) -> str:
  """A key path as 'a/b/0/c'."""
  return "/".join(key_name(k) for k in path)
