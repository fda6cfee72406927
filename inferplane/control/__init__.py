"""The control plane: declarative platform files reconciled into the repository (`inferplane apply`)."""
