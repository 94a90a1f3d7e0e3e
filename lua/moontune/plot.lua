-- moontune.plot — a hand-written SVG of the training and held-out loss.
--
--     plot.loss_svg(path, train, eval [, opts])
--
-- train  array of { step = n, loss = x }: the training loss per step
-- eval   array of { step = n, loss = x }: the held-out loss per evaluation
-- opts   { width = 640, height = 400, title = "loss" }
--
-- Writes one <svg> with axes, five ticks per axis, a polyline per series (always both,
-- empty when a series has no finite point) and a legend. Non-finite losses are left out.
-- plot.loss_svg_text(...) returns the text instead of writing it.

local M = {}

local function finite(x)
  return type(x) == "number" and x == x and x ~= math.huge and x ~= -math.huge
end

local function xml_escape(s)
  return (tostring(s):gsub("[&<>\"]", { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;" }))
end

local function tick_label(v)
  return string.format("%.4g", v)
end

function M.loss_svg_text(train, eval, opts)
  opts = opts or {}
  local W, H = opts.width or 640, opts.height or 400
  local left, right, top, bottom = 70, 20, 40, 50
  local pw, ph = W - left - right, H - top - bottom

  local series = { { pts = {}, color = "#1f77b4", name = "train loss" },
                   { pts = {}, color = "#ff7f0e", name = "held-out loss" } }
  local xmin, xmax, ymin, ymax = math.huge, -math.huge, math.huge, -math.huge
  for i, src in ipairs({ train or {}, eval or {} }) do
    for _, p in ipairs(src) do
      if finite(p.step) and finite(p.loss) then
        series[i].pts[#series[i].pts + 1] = p
        xmin, xmax = math.min(xmin, p.step), math.max(xmax, p.step)
        ymin, ymax = math.min(ymin, p.loss), math.max(ymax, p.loss)
      end
    end
  end
  if xmin > xmax then xmin, xmax, ymin, ymax = 0, 1, 0, 1 end
  if xmax == xmin then xmax = xmin + 1 end
  if ymax == ymin then ymin, ymax = ymin - 0.5, ymax + 0.5 end
  local pad = (ymax - ymin) * 0.05
  ymin, ymax = ymin - pad, ymax + pad

  local function sx(x) return left + (x - xmin) / (xmax - xmin) * pw end
  local function sy(y) return top + (ymax - y) / (ymax - ymin) * ph end

  local o = {}
  local function add(fmt, ...) o[#o + 1] = string.format(fmt, ...) end
  add('<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">',
      W, H, W, H)
  add('<rect x="0" y="0" width="%d" height="%d" fill="white"/>', W, H)
  add('<text x="%d" y="24" text-anchor="middle" font-size="14">%s</text>', W // 2, xml_escape(opts.title or "loss"))
  -- axes
  add('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="black"/>', left, top + ph, left + pw, top + ph)
  add('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="black"/>', left, top, left, top + ph)
  for i = 0, 4 do
    local xv = xmin + (xmax - xmin) * i / 4
    local x = sx(xv)
    add('<line x1="%.2f" y1="%d" x2="%.2f" y2="%d" stroke="black"/>', x, top + ph, x, top + ph + 5)
    add('<text x="%.2f" y="%d" text-anchor="middle">%s</text>', x, top + ph + 18, tick_label(xv))
    local yv = ymin + (ymax - ymin) * i / 4
    local y = sy(yv)
    add('<line x1="%d" y1="%.2f" x2="%d" y2="%.2f" stroke="black"/>', left - 5, y, left, y)
    add('<text x="%d" y="%.2f" text-anchor="end">%s</text>', left - 8, y + 4, tick_label(yv))
  end
  add('<text x="%d" y="%d" text-anchor="middle">step</text>', left + pw // 2, H - 10)
  add('<text x="16" y="%d" text-anchor="middle" transform="rotate(-90 16 %d)">loss</text>', top + ph // 2, top + ph // 2)
  -- series
  for _, s in ipairs(series) do
    local pts = {}
    for i, p in ipairs(s.pts) do pts[i] = string.format("%.2f,%.2f", sx(p.step), sy(p.loss)) end
    add('<polyline fill="none" stroke="%s" stroke-width="1.5" points="%s"/>', s.color, table.concat(pts, " "))
  end
  -- legend
  for i, s in ipairs(series) do
    local y = top + 10 + (i - 1) * 18
    add('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="2"/>', left + pw - 130, y, left + pw - 110, y, s.color)
    add('<text x="%d" y="%d">%s</text>', left + pw - 104, y + 4, xml_escape(s.name))
  end
  add("</svg>")
  return table.concat(o, "\n") .. "\n"
end

function M.loss_svg(path, train, eval, opts)
  local text = M.loss_svg_text(train, eval, opts)
  local f, err = io.open(path, "w")
  if not f then error("plot: cannot write " .. tostring(path) .. ": " .. tostring(err), 2) end
  f:write(text)
  f:close()
  return path
end

return M
