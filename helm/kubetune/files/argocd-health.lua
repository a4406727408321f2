-- Argo CD health check for kubetune.io/FineTuneJob
-- (argocd-cm key: resource.customizations.health.kubetune.io_FineTuneJob).
-- Maps status.phase to a health status; a status that has not yet seen the latest spec
-- (observedGeneration behind generation) is Progressing whatever its phase says.
local hs = {}

local function progress_message(status)
  local progress = status.progress
  if progress == nil then
    return nil
  end
  if progress.summary ~= nil and progress.summary ~= "" then
    return progress.summary
  end
  if progress.step ~= nil and progress.totalSteps ~= nil then
    return "step " .. tostring(progress.step) .. "/" .. tostring(progress.totalSteps)
  end
  return nil
end

local function with_default(text, default)
  if text == nil or text == "" then
    return default
  end
  return text
end

local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to pick up the FineTuneJob"
  return hs
end

local generation = obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local phase = status.phase
if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = with_default(status.message, "Fine-tuning succeeded")
elseif phase == "Validated" then
  -- A dry run (spec.dryRun) that found nothing to refuse: done, nothing trained.
  hs.status = "Healthy"
  hs.message = with_default(status.message, "Dry run passed")
elseif phase == "Failed" then
  hs.status = "Degraded"
  local reason = status.reason
  local message = with_default(status.message, "Fine-tuning failed")
  if reason ~= nil and reason ~= "" then
    message = reason .. ": " .. message
  end
  hs.message = message
elseif phase == "Queued" or phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = with_default(status.message, phase)
elseif phase == "Running" then
  hs.status = "Progressing"
  local progress = progress_message(status)
  if progress ~= nil then
    hs.message = "Running: " .. progress
  else
    hs.message = with_default(status.message, "Running")
  end
else
  -- Pending, or a phase this check does not know yet.
  hs.status = "Progressing"
  hs.message = with_default(status.message, phase)
end
return hs
