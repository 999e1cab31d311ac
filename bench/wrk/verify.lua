-- POST verify, cycling through the payment IDs in a file (one a line).
-- args: bearer token, IDs file
local token, ids, i = nil, {}, 0

local function read_ids(path)
  local found = {}
  for line in io.lines(path) do
    if line ~= "" then found[#found + 1] = line end
  end
  return found
end

function setup(thread)
  thread:set("offset", math.random(1, 1000))
end

function init(args)
  token = args[1]
  ids = read_ids(args[2])
  i = offset or 0
end

function request()
  i = i + 1
  local id = ids[(i % #ids) + 1]
  return wrk.format("POST", nil, {
    ["Authorization"] = "Bearer " .. token,
    ["Content-Type"] = "application/json",
  }, '{"payment_id": "' .. id .. '"}')
end
