"""Dataset sources, one file per source.

A *source* is a ``torch.utils.data.Dataset`` for one split whose ``__getitem__`` returns only the
input (a tensor or a PIL image); labels live in ``source.targets`` (``LongTensor [N, C]`` in
``{0, 1}``, or ``-1`` where the source itself has unknown labels) so that the datamodule can hide
labels reproducibly before any worker starts. A source also has ``class_names``, ``input_kind``
("image" or "vector") and a ``make_transform(train, **augment)`` static method; it may have
``file_names`` (needed by ``missing=file``).
"""
