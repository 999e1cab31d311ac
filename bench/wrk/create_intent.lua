-- POST a create request with a distinct Idempotency-Key on every request.
-- args: bearer token, run tag (unique per run), body, content type (default JSON)
local counter = 0
local token, tag, body, content_type

setup_counter = 0
function setup(thread)
  setup_counter = setup_counter + 1
  thread:set("tid", setup_counter)
end

function init(args)
  token, tag, body = args[1], args[2], args[3]
  content_type = args[4] or "application/json"
end

function request()
  counter = counter + 1
  return wrk.format("POST", nil, {
    ["Authorization"] = "Bearer " .. token,
    ["Content-Type"] = content_type,
    ["Idempotency-Key"] = tag .. "-" .. tid .. "-" .. counter,
  }, body)
end
