"""Pytree path helpers shared by the optimizer masks and the checkpoint checks."""
import jax


def key_name(key) -> str:
  """One path entry as text: dict key, attribute name or sequence index."""
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, (jax.tree_util.SequenceKey, jax.tree_util.FlattenedIndexKey)):
    return str(key.idx if hasattr(key, "idx") else key.key)
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path) -> str:
  """A key path as 'a/b/0/c'."""
  return "/".join(key_name(k) for k in path)
