-- hbtrio's Lua sandbox, run once in every new VM before any module.
--
-- It changes the VM's globals in place (what a process's modules see) and
-- returns a table of private functions that only the host (Python) holds:
-- calling the process's handler, snapshotting and restoring the heap.
--
-- Arguments: check (a host function that returns true when the running call
-- must stop: its deadline passed or its instance was closed) and the hook
-- interval, in VM instructions.
--
-- Rules kept here (docs/lua.md says why):
--   * nothing that reaches outside the VM: no io, no os but time, clock and
--     difftime, no package/require/dofile/loadfile, no debug, no string.dump,
--     load of text chunks only, no host objects;
--   * nothing that differs between two VMs fed the same messages: pairs and
--     next go in a fixed key order, table.sort is a stable merge sort,
--     tostring of a table or function shows no address, math.random is a
--     generator seeded by the host for every message, os.time is the
--     message's timestamp, collectgarbage reports nothing, and metatables
--     may not have __gc or __mode;
--   * a call that runs out of time, or out of memory, ends: pcall, xpcall and
--     coroutine.resume do not catch either.

local check, hook_count = ...

local G = _G
local type, next, rawget, rawset, rawequal = type, next, rawget, rawset, rawequal
local pcall, xpcall, error, select, tostring = pcall, xpcall, error, select, tostring
local setmetatable, load, ipairs = setmetatable, load, ipairs
local d_getmetatable, d_setmetatable = debug.getmetatable, debug.setmetatable
local sethook, getinfo = debug.sethook, debug.getinfo
local getupvalue, setupvalue = debug.getupvalue, debug.setupvalue
local upvalueid, upvaluejoin = debug.upvalueid, debug.upvaluejoin
local dump, pack, unpack = string.dump, string.pack, string.unpack
local format, srep = string.format, string.rep
local concat, tsort = table.concat, table.sort
local mtype, tointeger = math.type, math.tointeger
local co_create, co_resume = coroutine.create, coroutine.resume
local collect = collectgarbage

local STOPPED = "hbtrio: the call was stopped"
local NO_MEMORY = "not enough memory"

-- Stopping a call -----------------------------------------------------------------------

local stopped = false -- set by the hook once check() said so; cleared by each call

local function hook()
  if stopped or check() then
    stopped = true
    error(STOPPED, 0)
  end
end
sethook(hook, "", hook_count)

-- Rethrows what must end the call (a stop, no memory) out of a protected call.
local function rethrow(ok, ...)
  if not ok and (stopped or (...) == NO_MEMORY) then
    error((...), 0)
  end
  return ok, ...
end

G.pcall = function(f, ...)
  return rethrow(pcall(f, ...))
end
G.xpcall = function(f, handler, ...)
  return rethrow(xpcall(f, handler, ...))
end

-- Coroutines run under the hook too (a new coroutine has none of its own).
local function new_coroutine(f)
  local co = co_create(f)
  sethook(co, hook, "", hook_count)
  return co
end
coroutine.create = new_coroutine
coroutine.resume = function(co, ...)
  return rethrow(co_resume(co, ...))
end
coroutine.wrap = function(f)
  local co = new_coroutine(f)
  return function(...)
    local function results(ok, ...)
      if not ok then
        error((...), 0)
      end
      return ...
    end
    return results(rethrow(co_resume(co, ...)))
  end
end

-- What reaches outside ------------------------------------------------------------------

local message_ms = 0 -- the timestamp of the message being handled (Unix ms)

G.io, G.package, G.require, G.dofile, G.loadfile = nil, nil, nil, nil, nil
G.debug, G.python, G.loadstring, G.module = nil, nil, nil, nil
string.dump = nil
G.os = {
  time = function(t)
    if t ~= nil then
      error("os.time(table) is not in hbtrio's sandbox: os.time() is the message's time", 2)
    end
    return message_ms // 1000
  end,
  clock = function()
    return 0.0
  end,
  difftime = function(t2, t1)
    return (t2 - (t1 or 0)) + 0.0
  end,
}

G.load = function(...)
  local chunk, name, mode, env = ...
  if mode ~= nil and mode ~= "t" then
    error("load: only text chunks (mode \"t\") in hbtrio's sandbox", 2)
  end
  if select("#", ...) >= 4 then
    return load(chunk, name, "t", env)
  end
  return load(chunk, name, "t", G)
end

-- A fixed order for keys ------------------------------------------------------------------

local RANK = { number = 1, string = 2, boolean = 3 }

local function key_before(a, b)
  local ta, tb = type(a), type(b)
  if ta == tb then
    if ta == "boolean" then
      return b and not a
    end
    return a < b
  end
  return RANK[ta] < RANK[tb]
end

local function no_order(k)
  error("a table with a " .. type(k) .. " as a key has no fixed order in hbtrio's sandbox", 3)
end

-- The keys of t, sorted: numbers, then strings (byte order), then false, true.
local function sorted_keys(t)
  local keys, n, kind, mixed = {}, 0, nil, false
  for k in next, t do
    n = n + 1
    keys[n] = k
    local tk = type(k)
    if not RANK[tk] then
      no_order(k)
    end
    if kind == nil then
      kind = tk
    elseif kind ~= tk then
      mixed = true
    end
  end
  if n > 1 then
    if mixed or kind == "boolean" then
      tsort(keys, key_before)
    else
      tsort(keys) -- keys are distinct: one result, whatever the pivots
    end
  end
  return keys, n
end

local function weak(t)
  local mt = d_getmetatable(t)
  return mt ~= nil and rawget(mt, "__mode") ~= nil
end

G.pairs = function(t)
  local mt = d_getmetatable(t)
  local meta = mt and rawget(mt, "__pairs")
  if meta then
    local f, s, c = meta(t)
    return f, s, c
  end
  if type(t) ~= "table" then
    error("bad argument #1 to 'pairs' (table expected, got " .. type(t) .. ")", 2)
  end
  if weak(t) then
    error("pairs over a weak table has no fixed order in hbtrio's sandbox", 2)
  end
  local keys, n = sorted_keys(t)
  local i = 0
  return function()
    while i < n do
      i = i + 1
      local k = keys[i]
      local v = rawget(t, k)
      if v ~= nil then
        return k, v
      end
    end
    return nil
  end, t, nil
end

G.next = function(t, k)
  if type(t) ~= "table" then
    error("bad argument #1 to 'next' (table expected, got " .. type(t) .. ")", 2)
  end
  if k ~= nil and rawget(t, k) == nil then
    error("invalid key to 'next'", 2)
  end
  if next(t) == nil then
    return nil
  end
  local best = nil
  for key in next, t do
    if not RANK[type(key)] then
      no_order(key)
    end
    if (k == nil or key_before(k, key)) and (best == nil or key_before(key, best)) then
      best = key
    end
  end
  if best == nil then
    return nil
  end
  return best, rawget(t, best)
end

-- A stable merge sort: the same result for ties on every VM.
table.sort = function(t, lt)
  local n = #t
  if n < 2 then
    return
  end
  lt = lt or function(a, b)
    return a < b
  end
  local a, b = {}, {}
  for i = 1, n do
    a[i] = t[i]
  end
  local width = 1
  while width < n do
    local lo = 1
    while lo <= n do
      local mid, hi = lo + width, lo + 2 * width
      if mid > n + 1 then
        mid = n + 1
      end
      if hi > n + 1 then
        hi = n + 1
      end
      local l, r, k = lo, mid, lo
      while l < mid and r < hi do
        if lt(a[r], a[l]) then
          b[k], r = a[r], r + 1
        else
          b[k], l = a[l], l + 1
        end
        k = k + 1
      end
      while l < mid do
        b[k], l, k = a[l], l + 1, k + 1
      end
      while r < hi do
        b[k], r, k = a[r], r + 1, k + 1
      end
      lo = hi
    end
    a, b = b, a
    width = width * 2
  end
  for i = 1, n do
    t[i] = a[i]
  end
end

-- No addresses in text.
local function to_text(v)
  local tv = type(v)
  if tv == "table" or tv == "userdata" then
    local mt = d_getmetatable(v)
    if mt ~= nil then
      if rawget(mt, "__tostring") ~= nil then
        return tostring(v)
      end
      local name = rawget(mt, "__name")
      if type(name) == "string" then
        return name
      end
    end
    return tv
  elseif tv == "function" or tv == "thread" then
    return tv
  end
  return tostring(v)
end
G.tostring = to_text

string.format = function(fmt, ...)
  local n = select("#", ...)
  local args = { ... }
  for i = 1, n do
    local tv = type(args[i])
    if tv == "table" or tv == "function" or tv == "thread" or tv == "userdata" then
      args[i] = to_text(args[i])
    end
  end
  return format(fmt, table.unpack(args, 1, n))
end

G.setmetatable = function(t, mt)
  if type(mt) == "table" and (rawget(mt, "__gc") ~= nil or rawget(mt, "__mode") ~= nil) then
    error("setmetatable: __gc and __mode depend on the garbage collector's timing "
      .. "and are not in hbtrio's sandbox", 2)
  end
  return setmetatable(t, mt)
end

G.collectgarbage = function(opt, arg)
  if opt == nil or opt == "collect" or opt == "step" then
    collect(opt or "collect", arg)
  elseif opt == "isrunning" then
    return true
  end
  return 0
end

-- Random numbers: splitmix64, seeded by the host for every message.
local seed = 0
local function next_random()
  seed = seed + 0x9E3779B97F4A7C15
  local z = seed
  z = (z ~ (z >> 30)) * 0xBF58476D1CE4E5B9
  z = (z ~ (z >> 27)) * 0x94D049BB133111EB
  return z ~ (z >> 31)
end

local function integer_arg(x, i)
  local n = tointeger(x)
  if n == nil then
    error("bad argument #" .. i .. " to 'random' (number has no integer representation)", 3)
  end
  return n
end

math.random = function(m, n)
  local z = next_random()
  if m == nil then
    return (z >> 11) * (1.0 / 9007199254740992.0)
  end
  local lo, hi
  if n == nil then
    lo, hi = 1, integer_arg(m, 1)
  else
    lo, hi = integer_arg(m, 1), integer_arg(n, 2)
  end
  if lo > hi then
    error("bad argument #" .. (n == nil and 1 or 2) .. " to 'random' (interval is empty)", 2)
  end
  local span = hi - lo + 1 -- 0 or negative when the interval is wider than 2^63
  if span <= 0 then
    return lo + z
  end
  return lo + (z >> 1) % span
end

math.randomseed = function(x)
  seed = tointeger(x) or unpack("<j", pack("<d", x))
end

-- print: lines the call's result carries as its output.
local printed = {}
G.print = function(...)
  local n = select("#", ...)
  local parts = {}
  for i = 1, n do
    parts[i] = to_text((select(i, ...)))
  end
  printed[#printed + 1] = concat(parts, "\t")
end

-- What the sandbox starts with: named, so that a snapshot refers to it by name ----------

local STRING_META = d_getmetatable("")
local LIBRARIES = { "coroutine", "math", "os", "string", "table", "utf8" }

local known_name, known_value = {}, {} -- value <-> name of every builtin table and function
local baseline = {} -- known table -> its entries as the sandbox left them

local function know(name, value)
  known_name[value], known_value[name] = name, value
end

local function know_table(name, t)
  know(name, t)
  local copy = {}
  local keys, n = sorted_keys(t) -- in key order: a function known by two names gets the first
  for i = 1, n do
    local k = keys[i]
    local v = rawget(t, k)
    copy[k] = v
    if type(v) == "function" and known_name[v] == nil then
      know(name .. "." .. tostring(k), v)
    end
  end
  baseline[t] = copy
end

for _, lib in ipairs(LIBRARIES) do
  know_table(lib, G[lib])
end
know_table("_G", G)
know_table("#string-metatable", STRING_META)
-- Every builtin table is a root: one whose entries changed is written even when nothing
-- that changed refers to it.
local ROOTS = { "_G", "#string-metatable" }
for _, lib in ipairs(LIBRARIES) do
  ROOTS[#ROOTS + 1] = lib
end

-- Snapshots: the heap reachable from the globals -------------------------------------------
--
-- A snapshot is a list of nodes, the tables and Lua functions reachable from
-- the globals and the string metatable, in the order a breadth-first walk in
-- key order meets them; each is written once and referred to by number.
-- Builtin functions are written by name, builtin tables as the entries that
-- differ from the sandbox's (so a restore fills the new VM's own), a Lua
-- function as its bytecode and its upvalues (shared upvalues are joined again
-- on restore). Coroutines, host objects, functions made by the host (such as
-- string.gmatch's iterators), weak tables and tables with tables as keys
-- cannot be written: the snapshot fails, naming where it met one.

local MAGIC = "hbtrio-lua-heap/1"

local function snapshot()
  local ids, nodes, where = {}, {}, {}
  local cells, ncells = {}, 0
  local out, nout = {}, 0

  local function put(s)
    nout = nout + 1
    out[nout] = s
  end

  local function value(v, path)
    local tv = type(v)
    if v == nil then
      put("n")
    elseif tv == "boolean" then
      put(v and "T" or "F")
    elseif tv == "number" then
      if mtype(v) == "integer" then
        put(pack("<c1j", "i", v))
      else
        put(pack("<c1n", "d", v))
      end
    elseif tv == "string" then
      put(pack("<c1s4", "s", v))
    elseif tv == "function" and known_name[v] ~= nil then
      put(pack("<c1s4", "b", known_name[v]))
    elseif tv == "table" or tv == "function" then
      local id = ids[v]
      if id == nil then
        if tv == "function" and getinfo(v, "S").what == "C" then
          error(path .. ": a function made by the host cannot be snapshotted", 0)
        end
        id = #nodes + 1
        ids[v], nodes[id], where[id] = id, v, path
      end
      put(pack("<c1I4", "r", id))
    else
      error(path .. ": a " .. tv .. " cannot be snapshotted", 0)
    end
  end

  local function key_path(path, k)
    if type(k) == "string" and k:match("^[%a_][%w_]*$") then
      return path .. "." .. k
    end
    return path .. "[" .. to_text(k) .. "]"
  end

  local function entries(t, path, base)
    if weak(t) then
      error(path .. ": a weak table cannot be snapshotted", 0)
    end
    local keys, n = {}, 0
    for k, v in next, t do
      if not RANK[type(k)] then
        error(path .. ": a table with a " .. type(k) .. " as a key cannot be snapshotted", 0)
      end
      if base == nil or not rawequal(base[k], v) then
        n = n + 1
        keys[n] = k
      end
    end
    if base ~= nil then
      for k in next, base do
        if rawget(t, k) == nil then
          n = n + 1
          keys[n] = k
        end
      end
    end
    tsort(keys, key_before)
    put(pack("<I4", n))
    for i = 1, n do
      local k = keys[i]
      value(k, path)
      value(rawget(t, k), key_path(path, k))
    end
    value(d_getmetatable(t), path .. "<metatable>")
  end

  local function closure(f, path)
    put(pack("<s4", dump(f)))
    local nups = getinfo(f, "u").nups
    put(pack("<I4", nups))
    for i = 1, nups do
      local name, v = getupvalue(f, i)
      local cell = upvalueid(f, i)
      local c = cells[cell]
      if c == nil then
        ncells = ncells + 1
        cells[cell] = ncells
        put(pack("<I4", ncells))
        value(v, path .. "<upvalue " .. (name ~= "" and name or tostring(i)) .. ">")
      else
        put(pack("<I4", c))
      end
    end
  end

  put(MAGIC)
  put(pack("<I4", #ROOTS))
  for _, name in ipairs(ROOTS) do
    value(known_value[name], name)
  end
  local i = 0
  while i < #nodes do
    i = i + 1
    local v, path = nodes[i], where[i]
    if type(v) == "function" then
      put("L")
      closure(v, path)
    elseif known_name[v] ~= nil then
      put(pack("<c1s4", "K", known_name[v]))
      entries(v, path, baseline[v])
    else
      put("H")
      entries(v, path, nil)
    end
  end
  return concat(out)
end

local function restore(data)
  local pos = #MAGIC + 1
  if data:sub(1, #MAGIC) ~= MAGIC then
    error("not a snapshot of hbtrio's Lua device", 0)
  end
  local nodes, pending, seen_cells = {}, {}, {}

  -- A value as read: a plain value, or {id} for a node not yet made.
  local function read()
    local tag = data:sub(pos, pos)
    pos = pos + 1
    local v
    if tag == "n" then
      return nil
    elseif tag == "T" then
      return true
    elseif tag == "F" then
      return false
    elseif tag == "i" then
      v, pos = unpack("<j", data, pos)
    elseif tag == "d" then
      v, pos = unpack("<n", data, pos)
    elseif tag == "s" then
      v, pos = unpack("<s4", data, pos)
    elseif tag == "b" then
      local name
      name, pos = unpack("<s4", data, pos)
      v = known_value[name]
      if v == nil then
        error("the snapshot names a builtin this sandbox does not have: " .. name, 0)
      end
    elseif tag == "r" then
      local id
      id, pos = unpack("<I4", data, pos)
      return { id }
    else
      error("a damaged snapshot (tag " .. format("%q", tag) .. " at byte " .. (pos - 1) .. ")", 0)
    end
    return v
  end

  local function resolve(v)
    if type(v) == "table" then
      return nodes[v[1]]
    end
    return v
  end

  local function read_entries()
    local n
    n, pos = unpack("<I4", data, pos)
    local list = {}
    for j = 1, 2 * n do
      list[j] = read()
    end
    return list, read()
  end

  local nroots
  nroots, pos = unpack("<I4", data, pos)
  local roots = {}
  for j = 1, nroots do
    roots[j] = read()
  end
  local id = 0
  while pos <= #data do
    id = id + 1
    local tag = data:sub(pos, pos)
    pos = pos + 1
    if tag == "L" then
      local code, nups
      code, pos = unpack("<s4", data, pos)
      nups, pos = unpack("<I4", data, pos)
      local f = assert(load(code, nil, "b"))
      local ups = {}
      for j = 1, nups do
        local cell
        cell, pos = unpack("<I4", data, pos)
        local item = { cell = cell, first = not seen_cells[cell] }
        seen_cells[cell] = true
        if item.first then
          item.value = read()
        end
        ups[j] = item
      end
      nodes[id] = f
      pending[#pending + 1] = { kind = "L", f = f, ups = ups }
    elseif tag == "K" then
      local name
      name, pos = unpack("<s4", data, pos)
      local t = known_value[name]
      if type(t) ~= "table" then
        error("the snapshot names a builtin table this sandbox does not have: " .. name, 0)
      end
      nodes[id] = t
      local list, mt = read_entries()
      pending[#pending + 1] = { kind = "T", t = t, list = list, mt = mt }
    elseif tag == "H" then
      local t = {}
      nodes[id] = t
      local list, mt = read_entries()
      pending[#pending + 1] = { kind = "T", t = t, list = list, mt = mt }
    else
      error("a damaged snapshot (node " .. id .. ")", 0)
    end
  end

  local owner = {} -- cell -> {function, upvalue index} that holds it
  for _, p in ipairs(pending) do
    if p.kind == "L" then
      for j, item in ipairs(p.ups) do
        if item.first then
          owner[item.cell] = { p.f, j }
        end
      end
    end
  end
  for _, p in ipairs(pending) do
    if p.kind == "T" then
      local t, list = p.t, p.list
      for j = 1, #list, 2 do
        rawset(t, resolve(list[j]), resolve(list[j + 1]))
      end
      d_setmetatable(t, resolve(p.mt))
    else
      for j, item in ipairs(p.ups) do
        if item.first then
          setupvalue(p.f, j, resolve(item.value))
        else
          local o = owner[item.cell]
          upvaluejoin(p.f, j, o[1], o[2])
        end
      end
    end
  end
  if nroots ~= #ROOTS then
    error("a damaged snapshot (its roots)", 0)
  end
  for j, name in ipairs(ROOTS) do
    if resolve(roots[j]) ~= known_value[name] then
      error("a damaged snapshot (its roots)", 0)
    end
  end
end

-- The host's side -----------------------------------------------------------------------

local function error_text(e)
  if stopped then
    return STOPPED
  end
  if type(e) == "string" then
    return e
  end
  return to_text(e)
end

-- Runs f(...) as one call: a fresh stop flag, the message's time, seed and print lines.
-- Returns true and f's first result, or false and the error's text; then what was printed.
local function run(ms, rng, f, ...)
  stopped, message_ms, seed, printed = false, ms, rng, {}
  local ok, result = xpcall(f, error_text, ...)
  if not ok and stopped then
    result = STOPPED
  end
  local lines = printed
  printed = {}
  return ok, result, concat(lines, "\n")
end

local host = {}

-- Loads and runs one module's source (text only) in the globals.
function host.load_module(name, source, ms, rng)
  local chunk, err = load(source, "=" .. name, "t", G)
  if chunk == nil then
    return false, err, ""
  end
  return run(ms, rng, chunk)
end

-- Calls the global handle(msg, env).
function host.handle(msg, env, ms, rng)
  local handle = rawget(G, "handle")
  if type(handle) ~= "function" then
    return false, "the process's modules define no global function handle(msg, env)", ""
  end
  return run(ms, rng, handle, msg, env)
end

function host.snapshot()
  return run(0, 0, snapshot)
end

function host.restore(data)
  return run(0, 0, restore, data)
end

host.STOPPED = STOPPED
host.NO_MEMORY = NO_MEMORY

return host
