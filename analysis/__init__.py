"""Researcher-facing theory layer: drift estimators, sympy bound derivations, drift audit, figures.

Filled by the drift-analysis issue; the package is importable from the start so the workflow and
tests can depend on it.
"""
