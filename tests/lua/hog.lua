-- A memory hog on Action=Hog (and on Action=Sly, one that tries to catch the failure);
-- any other message counts.
Count = 0

local function hog()
  local t = {}
  for i = 1, math.maxinteger do
    t[i] = string.rep("x", 1024) .. i
  end
end

function handle(msg)
  if msg.Action == "Hog" then
    hog()
  elseif msg.Action == "Sly" then
    local ok = pcall(hog)
    Count = Count + 1
    return { Output = "survived: " .. tostring(ok) }
  end
  Count = Count + 1
  return { Output = Count }
end
