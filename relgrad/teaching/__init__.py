"""Course material that ships with the library but is not part of it: the book's exercise self-checks.

:mod:`relgrad.teaching.checks` holds one ``check_*`` function per coding exercise of the book (run on
seeded inputs against a reference computed by :mod:`relgrad`, with a hint for each typical mistake) and
``EXERCISE_CHECKS``, the map from exercise label to check (the instructors' page tabulates it).  A chapter
imports a check in the self-check cell after its exercise, and the nbgrader notebooks that
``tools/make_assignments.py`` writes call the same cell with ``strict=True``::

    from relgrad.teaching.checks import check_relative_gradient

The numerical library (:mod:`relgrad.numpy`, :mod:`relgrad.torch`, :mod:`relgrad.datasets`, ...) never
imports this package: it sits on top of everything else.
"""
