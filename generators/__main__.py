"""`python -m isda_viz.generators`: print the README's "Generators" table, made from the registry."""

from isda_viz.generators.registry import generator_table

print(generator_table())
