from authd.claims import lookup, string_list


def test_lookup_walks_dotted_names_and_prefers_exact_names():
    payload = {"custom": {"groups": ["a"], "deep": {"x": 1}}, "a.b": "exact", "a": {"b": "walk"}}
    assert lookup(payload, "custom.groups") == ["a"]
    assert lookup(payload, "custom.deep.x") == 1
    assert lookup(payload, "a.b") == "exact"
    assert lookup(payload, "custom.missing") is None
    assert lookup(payload, "custom.groups.0") is None  # lists are not walked
    assert lookup(payload, "") is None


def test_string_list_skips_what_is_not_a_string():
    assert string_list("sre") == ("sre",)
    assert string_list(["a", 1, None, "", "b", ["c"]]) == ("a", "b")
    assert string_list({"a": 1}) == ()
    assert string_list("") == ()
