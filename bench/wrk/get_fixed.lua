-- GET the URL's path with a bearer token: one request, built once.
-- args: bearer token
function init(args)
  wrk.headers["Authorization"] = "Bearer " .. args[1]
end
