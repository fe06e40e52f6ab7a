"""The chapters' libraries, each on top of the core: ch. 1 `interventions` + `localization`, ch. 2 `lenses` +
`latentlens`, ch. 3 `inversion` + its judge `classifier`; `plotting` and `report` serve all of them.
None of them imports the workshop (training code)."""
