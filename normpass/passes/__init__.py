"""The graph-rewrite machinery behind normpass.rewrite / explain / register_pattern.

One mechanism, in four steps per graph (root graph and higher-order-op subgraphs):

1. canonical.py: every node is seen as a `Term` of a small vocabulary (cast, square, mean, var,
   rsqrt, mul, add, layer_norm, ...), so the spellings of the three IRs (symbolic_trace, Dynamo,
   torch.export / core ATen) collapse and each pattern is written once (in normpass/patterns/).
2. manager.py: one walk over the nodes; the patterns registered for a node's canonical op (its
   anchor) try to match there (registry.py holds them; template.py turns a user's torch function
   into one). A match is a `Site` (match.py); a look-alike raises `Reject` with the reason.
3. A site whose removed intermediates are used elsewhere is left alone; otherwise rewriter.py inserts
   the normpass op the policy picks (fusing a residual add feeding it, see patterns/residual.py),
   keeps output dtypes (meta.py: from node metadata, or computed in the graph), and removes what died.
4. report.py: one row per site, rewritten or left alone, with module path, source line and reason.
"""
