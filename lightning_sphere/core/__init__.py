"""The vocabulary every stage shares, below all of them: which tensors form radially invariant groups
(:class:`~lightning_sphere.core.groups.ParamSlice`, :class:`~lightning_sphere.core.groups.InvariantGroups`), their
rows batched over modules (:class:`~lightning_sphere.core.rows.RowIndex`), the gradient test's thresholds, names as
the user wrote them through wrapper modules, and what one rank holds of a sharded tensor. Imports nothing else of the
package."""
