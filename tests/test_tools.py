"""Built-in tools on `Document`s built in the test: query_table's arithmetic, make_chart's figures, read_document,
and the toolbox's argument checks and error results."""

from __future__ import annotations

from typing import Any

import pytest

from clawdbot.charts import Chart, ChartError, build_chart
from clawdbot.documents import Document, Table
from clawdbot.table_query import TableQuery, TableQueryError, run_query, to_number
from clawdbot.tools import BUILTIN, Toolbox
from tests.tools_helpers import TOP_THREE, sales_document

SALES = sales_document().tables[0]


def query(**arguments: Any) -> Table:
    return run_query(SALES, TableQuery.from_arguments(arguments))


def test_numbers_written_as_text_count_and_booleans_do_not() -> None:
    assert [to_number(v) for v in ("1,234.5", "$12", "7%", " 3 ", "", "abc", None, True, 4, 2.5)] == [
        1234.5, 12.0, 7.0, 3.0, None, None, None, None, 4.0, 2.5,
    ]  # fmt: skip


def test_group_sum_sort_and_top_n_give_the_three_cities_with_the_highest_sales() -> None:
    result = query(group_by=["city"], value_column="SALES", sort_by="sum of Sales", limit=3)
    assert result.columns == ["City", "sum of Sales"]
    assert result.rows == [["Munich", 6300], ["Frankfurt", 4900], ["Hamburg", 4600]]
    assert [row[0] for row in result.rows] == TOP_THREE


def test_filters_combine_and_compare_numbers_as_numbers() -> None:
    assert query(filters=[{"column": "Sales", "op": ">", "value": 2000}], columns=["City"]).rows == [
        ["Munich"], ["Hamburg"], ["Munich"], ["Hamburg"], ["Frankfurt"],
    ]  # fmt: skip
    february = query(
        filters=[
            {"column": "Month", "op": "=", "value": "2025-02"},
            {"column": "City", "op": "in", "value": ["berlin", "Cologne"]},
        ],
        columns=["City", "Sales"],
    )
    assert february.rows == [["Berlin", 1500], ["Cologne", 950]]
    assert query(filters=[{"column": "City", "op": "contains", "value": "burg"}], aggregate="count").rows == [
        [2]
    ]


def test_mean_min_max_and_count_per_group() -> None:
    means = query(group_by=["City"], aggregate="mean", value_column="Sales", sort_by="City", descending=False)
    assert means.rows[0] == ["Berlin", 1350.25]
    assert query(aggregate="max", value_column="Sales").rows == [[3400]]
    assert query(aggregate="min", value_column="Sales").rows == [[400]]
    counted = query(group_by=["City"], aggregate="count", sort_by="count", limit=1, descending=True)
    assert counted.columns == ["City", "count"] and counted.rows[0][1] == 2


def test_sorting_puts_empty_cells_last_in_both_directions() -> None:
    for descending in (True, False):
        rows = query(columns=["City", "Sales"], sort_by="Sales", descending=descending).rows
        assert rows[-1] == ["Stuttgart", None]


def test_a_query_that_does_not_fit_the_table_says_what_would() -> None:
    with pytest.raises(
        TableQueryError, match="there is no column 'Revenue'; the columns are: 'City', 'Month', 'Sales'"
    ):
        query(group_by=["City"], value_column="Revenue")
    with pytest.raises(TableQueryError, match="holds no numbers"):
        query(group_by=["Month"], value_column="City")
    with pytest.raises(TableQueryError, match="value_column"):
        run_query(SALES, TableQuery(aggregate="sum"))


def test_a_bar_chart_of_a_result_holds_its_labels_and_values() -> None:
    result = query(group_by=["City"], value_column="Sales", sort_by="sum of Sales", limit=3)
    chart = build_chart(result, "bar", title="Top three cities")
    trace = chart.figure["data"][0]
    assert (trace["type"], trace["x"], trace["y"]) == ("bar", TOP_THREE, [6300.0, 4900.0, 4600.0])
    assert chart.figure["layout"]["title"]["text"] == "Top three cities"
    assert chart.points == 3 and Chart.from_json(chart.to_json()) == chart


def test_line_and_pie_charts_and_defaults_for_columns() -> None:
    line = build_chart(SALES, "line", x="Month", y=["Sales"])
    assert line.figure["data"][0]["mode"] == "lines+markers"
    pie = build_chart(query(group_by=["City"], value_column="Sales"), "pie")
    assert pie.figure["data"][0]["labels"][0] == "Berlin" and pie.figure["data"][0]["type"] == "pie"
    assert pie.title == "sum of Sales by City"


def test_chart_text_from_a_sheet_cannot_become_markup() -> None:
    hostile = Table("t", ["<b>City</b>", "Sales"], [["<img src=x onerror=alert(1)>", 5], ["A & B", 3]])
    figure = build_chart(hostile, "bar", title="<script>alert(1)</script>").figure
    text = str(figure)
    assert "<img" not in text and "<script" not in text and "<b>" not in text
    assert figure["data"][0]["x"] == ["&lt;img src=x onerror=alert(1)&gt;", "A &amp; B"]


def test_a_chart_that_cannot_be_drawn_says_why() -> None:
    with pytest.raises(ChartError, match="unknown chart kind 'radar'"):
        build_chart(SALES, "radar")
    with pytest.raises(ChartError, match="no column 'Profit'"):
        build_chart(SALES, "bar", y=["Profit"])
    with pytest.raises(ChartError, match="group or limit it with query_table"):
        build_chart(Table("big", ["k", "v"], [[str(i), i] for i in range(600)]), "bar")


# -- the toolbox -------------------------------------------------------------------------------------


def toolbox(*documents: Document) -> Toolbox:
    return Toolbox.for_agent(list(BUILTIN), documents=documents)


def test_tools_are_offered_only_when_the_request_has_what_they_need() -> None:
    assert toolbox().schemas() == []
    pdf = Document("report.pdf", "1" * 64, "pdf", pages=["page one", "page two"])
    assert [s["function"]["name"] for s in toolbox(pdf).schemas()] == ["read_document"]
    assert [s["function"]["name"] for s in toolbox(sales_document()).schemas()] == [
        "read_document", "query_table", "make_chart",
    ]  # fmt: skip


def test_query_table_results_can_be_charted_by_name() -> None:
    box = toolbox(sales_document())
    first = box.call(
        "query_table", {"group_by": ["City"], "value_column": "Sales", "sort_by": "sum of Sales", "limit": 3}
    )
    assert first.error == "" and first.content.startswith("result 1: 3 rows from sheet 'Sales'")
    assert "| Munich | 6300 |" in first.content
    chart = box.call("make_chart", {"kind": "bar", "source": "Result 1", "title": "Top 3"})
    assert chart.error == "" and chart.chart is not None
    assert chart.chart.figure["data"][0]["x"] == TOP_THREE
    record = chart.record()
    assert record["name"] == "make_chart" and record["chart"] == "Top 3" and record["duration_ms"] >= 0
    from_sheet = box.call("make_chart", {"kind": "pie", "source": "Sales", "x": "City", "y": "Sales"})
    assert from_sheet.chart is not None and from_sheet.chart.kind == "pie"


def test_bad_arguments_become_error_results_for_the_model() -> None:
    box = toolbox(sales_document())
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("query_table", {"limit": "three"}, "at 'limit': 'three' is not of type 'integer'"),
        (
            "query_table",
            {"code": "import os"},
            "Additional properties are not allowed ('code' was unexpected)",
        ),
        ("query_table", {"filters": [{"column": "City", "op": "like", "value": "x"}]}, "at 'filters/0/op'"),
        (
            "query_table",
            {"table": "Missing"},
            "there is no sheet 'Missing'; the sheets are: 'Sales', 'Notes'",
        ),
        (
            "make_chart",
            {"kind": "bar", "source": "result 9"},
            "there is no 'result 9'; query_table results so far: none yet",
        ),
        ("make_chart", {"source": "Sales"}, "'kind' is a required property"),
        ("drop_database", {}, "there is no tool 'drop_database' in this request"),
    ]
    for name, arguments, message in cases:
        result = box.call(name, arguments)
        assert message in result.error, (name, result.error)
        assert result.content == f"error: {result.error}" and result.chart is None
        assert result.record()["result"] == "" and result.record()["error"] == result.error


def test_read_document_reads_pages_and_searches() -> None:
    pages = [f"Page {n} talks about topic {n}." for n in range(1, 24)]
    pages[16] = "The warranty lasts five years from delivery."
    document = Document("manual.pdf", "2" * 64, "pdf", pages=pages)
    box = toolbox(document)
    read = box.call("read_document", {"first_page": 2, "last_page": 3})
    assert "Page 2 talks" in read.content and "Page 3 talks" in read.content and "Page 4" not in read.content
    found = box.call("read_document", {"search": "warranty years"})
    assert found.content.startswith("[page 17] The warranty lasts five years")
    past = box.call("read_document", {"first_page": 40})
    assert past.error == "manual.pdf has 23 pages; ask for pages 1 to 23"
    wrong = box.call("read_document", {"document": "other.pdf"})
    assert wrong.error == "no attached document is called 'other.pdf'; attached: 'manual.pdf'"
