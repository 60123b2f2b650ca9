-- A counter: every message adds its N tag (1 without one) and answers the total.
Count = Count or 0

function handle(msg, env)
  local n = tonumber(msg.N or "1")
  Count = Count + n
  return { Output = tostring(Count) }
end
