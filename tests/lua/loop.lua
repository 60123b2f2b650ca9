-- An endless loop on Action=Spin, one that catches its own errors on Action=Sly, one in a
-- coroutine on Action=Co; a slow but finite one on Action=Slow; any other message counts.
Count = 0

local function spin()
  while true do
  end
end

function handle(msg)
  if msg.Action == "Spin" then
    spin()
  elseif msg.Action == "Sly" then
    while true do
      pcall(spin) -- the stop is not caught
    end
  elseif msg.Action == "Co" then
    local co = coroutine.wrap(spin)
    co()
  elseif msg.Action == "Slow" then
    local x = 0
    for i = 1, tonumber(msg.Steps) do
      x = x + i % 7
    end
    Count = Count + 1
    return { Output = x }
  end
  Count = Count + 1
  return { Output = Count }
end
