"""Access control: one policy (principals, roles, grants with row filters and hidden fields),
enforced by the storage server (compiled identities) and by this library (scans, writes)."""
