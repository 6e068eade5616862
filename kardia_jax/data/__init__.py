"""KardiaBench data: schema, span markers, parsing, sources, the shipped sample and Grain pipelines."""
