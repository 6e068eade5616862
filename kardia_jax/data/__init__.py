"""KardiaBench data: schema, parsing, sources, the shipped sample and Grain pipelines."""
