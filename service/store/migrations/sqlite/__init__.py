"""SQLite migrations, `NNNN_name.sql`, applied in order by `service.store.migrations`.

A package (not a plain folder) so that the SQL files ship with the installed distribution.
"""
