-- A handler that errors: a Lua error on Action=Boom (after changing a global), an error
-- reported in the result on Action=Report; any other message counts.
Count = 0

function handle(msg)
  if msg.Action == "Boom" then
    Count = Count + 100 -- changed, then the error: a recorded failure rolls this back
    error("boom: " .. (msg.Reason or "no reason"))
  elseif msg.Action == "Throw" then
    error({ code = 7 }) -- an error that is not a string
  elseif msg.Action == "Report" then
    Count = Count + 1000 -- a reported error keeps what the handler did
    return { Error = "reported: " .. (msg.Reason or "no reason") }
  elseif msg.Action == "Bad" then
    return { Output = function() end } -- not a message value
  end
  Count = Count + 1
  return { Output = Count }
end
