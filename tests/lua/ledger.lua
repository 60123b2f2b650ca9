-- A token ledger: balances by account, minted by the process's owner, moved by transfers.
--
-- Actions (the message's Action tag):
--   Mint      Quantity            the owner creates tokens in its own account
--   Transfer  Recipient Quantity  moves tokens from the sender; notices go to both sides
--   Balance   [Target]            the balance of Target (default: the sender)
--   Balances                      every balance, as a table
--   Holders                       the accounts holding tokens, in iteration order
--   Raffle                        a holder drawn with math.random, weighted by balance
--   Supply                        the total, summed over pairs(Balances)

Balances = Balances or {}
Ticker = "TOK"

local actions = {} -- a module-local table of closures: kept by snapshots as an upvalue

local function on(action, fn)
  actions[action] = fn
end

local function quantity(msg)
  local n = math.tointeger(tonumber(msg.Quantity))
  if n == nil or n <= 0 then
    error("Quantity must be a positive integer, not " .. tostring(msg.Quantity))
  end
  return n
end

on("Mint", function(msg, env)
  if msg.From ~= env.Process.Owner then
    return { Error = "only the owner mints" }
  end
  local n = quantity(msg)
  Balances[msg.From] = (Balances[msg.From] or 0) + n
  return { Output = "minted " .. n }
end)

on("Transfer", function(msg)
  local n = quantity(msg)
  local from, to = msg.From, msg.Recipient
  if (Balances[from] or 0) < n then
    return {
      Error = "insufficient balance",
      Messages = { { Target = from, Tags = { { name = "Action", value = "Transfer-Error" } } } },
    }
  end
  Balances[from] = Balances[from] - n
  Balances[to] = (Balances[to] or 0) + n
  return {
    Output = from .. " -> " .. to .. ": " .. n,
    Messages = {
      { Target = from, Action = "Debit-Notice", Quantity = tostring(n), Recipient = to },
      { Target = to, Tags = { Action = "Credit-Notice", Quantity = tostring(n), Sender = from } },
    },
  }
end)

on("Balance", function(msg)
  local who = msg.Account or msg.From
  return { Output = { data = Balances[who] or 0, Ticker = Ticker } }
end)

on("Balances", function()
  return { Output = Balances }
end)

on("Holders", function()
  local out = {}
  for who, n in pairs(Balances) do
    if n > 0 then
      out[#out + 1] = who
    end
  end
  return { Output = table.concat(out, ",") }
end)

on("Raffle", function()
  local total, tickets = 0, {}
  for who, n in pairs(Balances) do
    total = total + n
    tickets[#tickets + 1] = { who = who, upto = total }
  end
  if total == 0 then
    return { Error = "nobody holds tokens" }
  end
  local draw = math.random(total)
  for _, t in ipairs(tickets) do
    if draw <= t.upto then
      return { Output = t.who, Messages = { { Target = t.who, Action = "Won", Draw = draw } } }
    end
  end
end)

on("Supply", function()
  local total = 0
  for _, n in pairs(Balances) do
    total = total + n
  end
  return { Output = total }
end)

function handle(msg, env)
  local fn = actions[msg.Action]
  if fn == nil then
    return { Error = "no such action: " .. tostring(msg.Action) }
  end
  return fn(msg, env)
end
