//! Charts as SVG, drawn on the server: line charts, sparklines, a node-state bar
//! and a pipeline's graph. Pure functions of numbers; labels are reduced to a safe
//! alphabet, so the markup needs no escaping.

use std::fmt::Write;

/// One line of a chart: (x, y) points in x order.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

const COLORS: [&str; 6] = [
    "#1f6feb", "#d4760a", "#1a7f37", "#8250df", "#cf222e", "#0a7ea4",
];

/// Letters, digits and a few marks: what a label may show in the markup.
fn safe(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_alphanumeric() || " _-.,:/%()#=".contains(*c))
        .take(60)
        .collect()
}

/// A number as a chart's axis shows it.
pub fn short(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 1e6 {
        format!("{:.1}M", value / 1e6)
    } else if magnitude >= 1e4 {
        format!("{:.0}k", value / 1e3)
    } else if magnitude >= 100.0 || value == value.trunc() {
        format!("{value:.0}")
    } else if magnitude >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.4}")
    }
}

/// A line chart of `series` (`y_max`: a fixed top, as 100 for percentages).
pub fn line(series: &[Series], y_max: Option<f64>, what: &str) -> String {
    const W: f64 = 480.0;
    const H: f64 = 180.0;
    const LEFT: f64 = 44.0;
    const BOTTOM: f64 = 22.0;
    let all = || series.iter().flat_map(|s| s.points.iter());
    let mut svg = format!(
        r#"<svg class="chart" viewBox="0 0 {W} {H}" role="img" aria-label="{}"><title>{}</title>"#,
        safe(what),
        safe(what)
    );
    let Some(first) = all().next() else {
        svg.push_str(r#"<text x="50%" y="50%" text-anchor="middle">no points yet</text></svg>"#);
        return svg;
    };
    let (mut x0, mut x1, mut y0, mut y1) = (first.0, first.0, first.1, first.1);
    for &(x, y) in all() {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let y0 = y0.min(0.0);
    let y1 = y_max.unwrap_or(if y1 > y0 { y1 } else { y0 + 1.0 });
    let span_x = if x1 > x0 { x1 - x0 } else { 1.0 };
    let span_y = if y1 > y0 { y1 - y0 } else { 1.0 };
    let px = |x: f64| LEFT + (x - x0) / span_x * (W - LEFT - 6.0);
    let py = |y: f64| (H - BOTTOM) - (y.clamp(y0, y1) - y0) / span_y * (H - BOTTOM - 8.0);
    for tick in [y0, y0 + span_y / 2.0, y1] {
        let y = py(tick);
        let _ = write!(
            svg,
            r#"<line class="grid" x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            W - 6.0,
            LEFT - 4.0,
            y + 3.0,
            short(tick),
        );
    }
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<String> = s
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        if points.len() == 1 {
            let (x, y) = s.points[0];
            let _ = write!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{color}"/>"#,
                px(x),
                py(y)
            );
        } else {
            let _ = write!(
                svg,
                r#"<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{}"><title>{}</title></polyline>"#,
                points.join(" "),
                safe(&s.label)
            );
        }
        if series.len() > 1 {
            let _ = write!(
                svg,
                r#"<text x="{}" y="{}" fill="{color}">{}</text>"#,
                LEFT + 4.0 + 90.0 * i as f64,
                H - 6.0,
                safe(&s.label)
            );
        }
    }
    svg.push_str("</svg>");
    svg
}

/// A small line of `values` (0..=max), for a table cell.
pub fn sparkline(values: &[f64], max: f64, what: &str) -> String {
    const W: f64 = 90.0;
    const H: f64 = 20.0;
    if values.is_empty() {
        return "—".into();
    }
    let step = if values.len() > 1 {
        W / (values.len() - 1) as f64
    } else {
        0.0
    };
    let max = if max > 0.0 { max } else { 1.0 };
    let points: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            format!(
                "{:.1},{:.1}",
                i as f64 * step,
                H - 1.0 - v.clamp(0.0, max) / max * (H - 2.0)
            )
        })
        .collect();
    format!(
        r##"<svg class="spark" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="{}"><polyline fill="none" stroke="#1f6feb" stroke-width="1.5" points="{}"/></svg>"##,
        safe(what),
        points.join(" ")
    )
}

/// A cluster's nodes by state, as one bar: (state, count, color).
pub fn state_bar(parts: &[(&str, u32, &str)]) -> String {
    const W: f64 = 160.0;
    let total: u32 = parts.iter().map(|p| p.1).sum();
    let described: Vec<String> = parts
        .iter()
        .filter(|p| p.1 > 0)
        .map(|(state, n, _)| format!("{n} {state}"))
        .collect();
    let label = if described.is_empty() {
        "no nodes".to_string()
    } else {
        described.join(", ")
    };
    let mut svg = format!(
        r##"<svg class="bar" width="{W}" height="14" viewBox="0 0 {W} 14" role="img" aria-label="{}"><title>{}</title><rect width="{W}" height="14" fill="#eef1f4"/>"##,
        safe(&label),
        safe(&label)
    );
    let mut x = 0.0;
    for (_, n, color) in parts {
        if *n == 0 || total == 0 {
            continue;
        }
        let width = f64::from(*n) / f64::from(total) * W;
        let _ = write!(
            svg,
            r#"<rect x="{x:.1}" width="{width:.1}" height="14" fill="{color}"/>"#
        );
        x += width;
    }
    svg.push_str("</svg>");
    svg
}

/// A pipeline's steps as a graph: each step in the column after the last step it
/// reads; `steps` in an order where each follows those it reads, as (name,
/// status, reads).
pub fn dag(steps: &[(String, String, Vec<String>)]) -> String {
    const BOX_W: f64 = 150.0;
    const BOX_H: f64 = 34.0;
    const GAP_X: f64 = 60.0;
    const GAP_Y: f64 = 14.0;
    let mut column: std::collections::HashMap<&str, usize> = Default::default();
    let mut rows: Vec<usize> = Vec::new();
    let mut place: Vec<(usize, usize)> = Vec::new();
    for (name, _, reads) in steps {
        let col = reads
            .iter()
            .filter_map(|r| column.get(r.as_str()))
            .map(|c| c + 1)
            .max()
            .unwrap_or(0);
        column.insert(name, col);
        if rows.len() <= col {
            rows.resize(col + 1, 0);
        }
        place.push((col, rows[col]));
        rows[col] += 1;
    }
    let width = rows.len() as f64 * (BOX_W + GAP_X);
    let height = rows.iter().copied().max().unwrap_or(0) as f64 * (BOX_H + GAP_Y) + GAP_Y;
    let at = |(col, row): (usize, usize)| {
        (
            col as f64 * (BOX_W + GAP_X) + 4.0,
            row as f64 * (BOX_H + GAP_Y) + GAP_Y,
        )
    };
    let mut svg = format!(
        r#"<svg class="chart dag" id="dag" viewBox="0 0 {width} {height}" role="img" aria-label="the pipeline's steps"><title>the pipeline's steps</title>"#
    );
    let index: std::collections::HashMap<&str, usize> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.0.as_str(), i))
        .collect();
    for (i, (_, _, reads)) in steps.iter().enumerate() {
        let (x, y) = at(place[i]);
        for read in reads {
            if let Some(&j) = index.get(read.as_str()) {
                let (fx, fy) = at(place[j]);
                let _ = write!(
                    svg,
                    r##"<line x1="{:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#8c959f" stroke-width="1.5"/>"##,
                    fx + BOX_W,
                    fy + BOX_H / 2.0,
                    y + BOX_H / 2.0
                );
            }
        }
    }
    for (i, (name, status, _)) in steps.iter().enumerate() {
        let (x, y) = at(place[i]);
        let fill = match status.as_str() {
            "completed" => "#dafbe1",
            "failed" | "timed_out" => "#ffebe9",
            "running" | "preparing" => "#ddf4ff",
            _ => "#f6f8fa",
        };
        let _ = write!(
            svg,
            r##"<rect x="{x:.1}" y="{y:.1}" width="{BOX_W}" height="{BOX_H}" rx="5" fill="{fill}" stroke="#8c959f"/><text x="{:.1}" y="{:.1}" font-size="12">{}</text><text x="{:.1}" y="{:.1}">{}</text>"##,
            x + 8.0,
            y + 14.0,
            safe(name),
            x + 8.0,
            y + 28.0,
            safe(status)
        );
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_chart_draws_each_series_within_its_box() {
        let svg = line(
            &[Series {
                label: "loss".into(),
                points: vec![(0.0, 2.0), (1.0, 1.0), (2.0, 0.5)],
            }],
            None,
            "loss by step",
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        let points = svg.split("points=\"").nth(1).expect("a polyline");
        let points = points.split('"').next().expect("its points");
        for pair in points.split(' ') {
            let (x, y) = pair.split_once(',').expect("x,y");
            let (x, y): (f64, f64) = (x.parse().expect("x"), y.parse().expect("y"));
            assert!(
                (0.0..=480.0).contains(&x) && (0.0..=180.0).contains(&y),
                "{pair}"
            );
        }
        // The highest value is drawn highest (smallest y).
        let ys: Vec<f64> = points
            .split(' ')
            .map(|p| p.split_once(',').expect("pair").1.parse().expect("y"))
            .collect();
        assert!(ys[0] < ys[1] && ys[1] < ys[2], "{ys:?}");
    }

    #[test]
    fn empty_charts_say_so_and_labels_cannot_break_the_markup() {
        assert!(line(&[], None, "cpu").contains("no points yet"));
        let svg = line(
            &[Series {
                label: "<script>alert(1)</script>".into(),
                points: vec![(0.0, 1.0), (1.0, 2.0)],
            }],
            Some(100.0),
            "a\"b",
        );
        assert!(!svg.contains("<script") && !svg.contains("a\"b"), "{svg}");
    }

    #[test]
    fn odd_numbers_draw_without_panicking() {
        // MLflow lets a job log NaN and infinities; a chart must still render.
        for points in [
            vec![(0.0, f64::NAN), (1.0, f64::NAN)],
            vec![(0.0, f64::INFINITY), (1.0, 1.0)],
            vec![(0.0, f64::NEG_INFINITY), (1.0, f64::NEG_INFINITY)],
            vec![(f64::NAN, 1.0), (1.0, f64::NAN)],
        ] {
            for top in [None, Some(100.0)] {
                let svg = line(
                    &[Series {
                        label: "x".into(),
                        points: points.clone(),
                    }],
                    top,
                    "x",
                );
                assert!(svg.ends_with("</svg>"));
            }
        }
        assert!(sparkline(&[f64::NAN, 1.0, f64::INFINITY], f64::NAN, "s").ends_with("</svg>"));
    }

    #[test]
    fn the_state_bar_splits_its_width_by_count() {
        let bar = state_bar(&[
            ("idle", 1, "#aaa"),
            ("running", 3, "#bbb"),
            ("leaving", 0, "#ccc"),
        ]);
        assert!(
            bar.contains(r#"width="40.0""#) && bar.contains(r#"width="120.0""#),
            "{bar}"
        );
        assert!(bar.contains("1 idle, 3 running"));
        assert!(state_bar(&[("idle", 0, "#aaa")]).contains("no nodes"));
    }

    #[test]
    fn a_dag_puts_each_step_after_what_it_reads() {
        let svg = dag(&[
            ("prep".into(), "completed".into(), vec![]),
            ("train".into(), "running".into(), vec!["prep".into()]),
            (
                "eval".into(),
                "waiting".into(),
                vec!["train".into(), "prep".into()],
            ),
        ]);
        let x_of = |name: &str| -> f64 {
            let before = svg
                .split(&format!(">{name}</text>"))
                .next()
                .expect("the step");
            let text = before.rsplit("<text x=\"").next().expect("its text");
            text.split('"')
                .next()
                .expect("x")
                .parse()
                .expect("a number")
        };
        assert!(x_of("prep") < x_of("train") && x_of("train") < x_of("eval"));
        assert_eq!(svg.matches("<line").count(), 3);
    }
}
