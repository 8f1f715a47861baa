"""Other tools' formats: TRL's config keys mapped to compo's (trl_map) and `compo config
--from-trl` (from_trl). It may import compo.core."""
